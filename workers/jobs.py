"""The contract shared by the API and the workers: job specs, states, queue and task names.

Pydantic only; importing this never loads torch or celery.
"""

from __future__ import annotations

import difflib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from importlib.metadata import PackageNotFoundError, version
from pathlib import PurePath
from typing import ClassVar, Literal, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

__all__ = [
    "QUEUES",
    "SQUEEZERS",
    "CONV_TYPES",
    "VERSION",
    "AnalysisKind",
    "AnalysisState",
    "BENIGN_COPIES",
    "Compression",
    "Dtype",
    "ExtractionSpec",
    "InputKind",
    "JobState",
    "LayerInfo",
    "Listing",
    "ModelInfo",
    "Preprocessing",
    "Source",
    "TaskName",
    "cap_spatial",
    "IMAGE_SUFFIXES",
    "close_matches",
    "gradcam_class",
    "host_compression",
    "kind_of",
    "nataraj_width",
    "new_id",
    "now",
    "poll",
    "stored_shape",
]

QUEUES = ("screen", "extract", "analysis")
# How `acts` is stored: uint8 is per-channel affine quantisation, per batch
# (workers/storage/quantised.py).
Dtype = Literal["float16", "float32", "uint8"]
# The codec of every array a job writes.
Compression = Literal["zstd", "lz4", "none"]


def host_compression(gpu: bool) -> Compression:
    """The codec a job gets when it names none, by what runs its forward: on a GPU host the
    host cores are free and zstd compresses best for its CPU time; on a CPU-only host the
    forward uses every core, so every CPU-second of encoding shows up in wall time, and lz4
    keeps the scan at the peer's rate (tests/bench/extraction.py, figures in its README)."""
    return "zstd" if gpu else "lz4"


class TaskName(StrEnum):
    RUN_BATCH = "actmap.run_batch"
    REGISTER_MODEL = "actmap.register_model"
    ANALYSE = "actmap.analyse"
    SCREEN_SAMPLE = "actmap.screen_sample"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Never stored: status derives it for an unfinished job that is not progressing (no
    # worker, batches with no task, interrupted), with the reason.
    STALLED = "stalled"

    @property
    def finished(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING, JobState.STALLED)


# Layer types whose weights are filters drawn as pictures (a catalogue's `type`).
CONV_TYPES = ("Conv1d", "Conv2d")


class AnalysisKind(StrEnum):
    """What an analysis computes; the value is what the store records as its `kind`."""

    HEALTH = "health"
    COMPARE = "compare"
    SIGNATURES = "signatures"
    SCREENING_PROFILE = "screening-profile"
    EXPLAIN = "explain"
    ATLAS = "atlas"


class AnalysisState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (AnalysisState.SUCCEEDED, AnalysisState.FAILED)


def _version() -> str:
    try:
        return version("actmap")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


VERSION = _version()


def now() -> str:
    """The current moment as stored in attrs: UTC, ISO 8601, milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def new_id() -> str:
    """A job or analysis id: sortable by creation time, unique by its random tail."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


T = TypeVar("T")


def poll(
    read: Callable[[], T],
    done: Callable[[T], bool],
    every: float,
    timeout: float | None = None,
    grow: float = 1.0,
    most: float | None = None,
    pause: Callable[[float], object] = time.sleep,
) -> T:
    """Read until `done` says so of what was read, or until `timeout` seconds have passed;
    returns what was read last. The pause between reads is `every` seconds, multiplied by
    `grow` after each up to `most`; `pause` may end one early (a listener woken by the
    event waited for)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        found = read()
        if done(found):
            return found
        left = every if deadline is None else min(every, deadline - time.monotonic())
        if left <= 0:
            return found
        pause(left)
        every = every * grow if most is None else min(every * grow, most)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# A job's `squeeze` column: the softmax's L1 change under each of Xu et al.'s squeezers.
SQUEEZERS = ("bit_depth", "median")
# The benign copies a job stores with `benign`, made by extraction/squeezing.py: Gaussian
# noise of per-pixel std 0.05 to 0.3, a blur of sigma 1, JPEG-like quantisation of step 0.25.
# Their names are group names in the store.
BENIGN_COPIES = ("noise-0.05", "noise-0.1", "noise-0.2", "noise-0.3", "blur-1.0", "jpeg-0.25")


# What a model reads: decoded images, `.npy` arrays, or any file drawn as a Nataraj image.
InputKind = Literal["image", "array", "binary"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif"}


def kind_of(path: str) -> InputKind:
    """What a file is by its name: an image, a `.npy` array, or else a binary."""
    suffix = PurePath(path).suffix.lower()
    return "array" if suffix == ".npy" else "image" if suffix in IMAGE_SUFFIXES else "binary"


# Nataraj et al. (2011): image width by file size, upper bounds in KiB.
_WIDTHS = ((10, 32), (30, 64), (60, 128), (100, 256), (200, 384), (500, 512), (1000, 768))


def nataraj_width(size: int) -> int:
    """Image width for a binary of `size` bytes (Nataraj et al. 2011): part of the
    contract, since the atlas maps a crop of the drawn binary back to its byte offsets."""
    for upper_kib, width in _WIDTHS:
        if size < upper_kib * 1024:
            return width
    return 1024


class _Declared(_Frozen):
    """A model whose fields in `_OPTIONAL` are dumped only when not at their default: what
    was stored before they existed is stored byte for byte the same."""

    _OPTIONAL: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        dumped: dict[str, object] = handler(self)
        fields = type(self).model_fields
        return {
            k: v
            for k, v in dumped.items()
            if k not in self._OPTIONAL or getattr(self, k) != fields[k].default
        }


class Preprocessing(_Declared):
    """How a model wants its input: resize to `size`, convert to `channels`, then
    `(x * scale - mean) / std` per channel; what it reads (`input_kind`) and what its
    outputs mean (`classes`), when declared."""

    _OPTIONAL = ("classes", "input_kind")

    size: tuple[int, int] = Field(description="input height and width")
    channels: Literal[1, 3]
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    classes: tuple[str, ...] | None = Field(
        default=None, description="the name of each output, in order; folder labels use them"
    )
    input_kind: InputKind | None = Field(
        default=None, description="image, array or binary: files of another kind are skipped"
    )

    @model_validator(mode="after")
    def _per_channel(self) -> Self:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                raise ValueError(f"{name} needs 1 or {self.channels} values, got {len(values)}")
        if any(s == 0 for s in self.std):
            raise ValueError("std must not contain 0")
        if min(self.size) < 1:
            raise ValueError("size must be positive")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be distinct names")
        return self

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)


class LayerInfo(_Declared):
    """One row of a model's layer catalogue, from a dry run at the declared input shape."""

    _OPTIONAL = ("calls", "rf_offset")

    name: str
    type: str
    output_shape: tuple[int, ...] = Field(description="per sample, without the batch dimension")
    params: int
    receptive_field: tuple[int, ...] | None = None
    rf_stride: tuple[int, ...] | None = None
    rf_offset: tuple[int, ...] | None = Field(
        default=None,
        description="where position 0's field starts in input pixels (negative: padding)",
    )
    # A module called more than once per forward (a shared ReLU) has one output per call;
    # a job stores one per layer, so such a layer is refused at submission.
    calls: int = Field(default=1, description="times the module runs in one forward pass")

    @property
    def flat(self) -> bool:
        return len(self.output_shape) == 1


class ModelInfo(_Frozen):
    """What registration learns about a model; stored in every job's attrs."""

    name: str
    format: Literal["pt2", "factory"]
    sha256: str
    preprocessing: Preprocessing
    frozen_batch: int | None = None
    classes: int = Field(description="width of the model's output (the logits)")
    layers: tuple[LayerInfo, ...]

    def layer(self, name: str) -> LayerInfo:
        for info in self.layers:
            if info.name == name:
                return info
        raise KeyError(name)

    def layer_names(self) -> list[str]:
        return [info.name for info in self.layers]


def close_matches(name: str, known: list[str]) -> str:
    """A phrase naming the closest known names, for 'unknown X' messages."""
    near = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    if not near:
        near = [k for k in known if name in k][:5]
    return f"close matches: {', '.join(near)}" if near else "run `actmap layers` to list them"


class ExtractionSpec(_Declared):
    """An extraction job as submitted. Layers are checked against the model's catalogue at
    plan time, where it is known."""

    _OPTIONAL = ("input_kind", "gradcam", "gradcam_target", "compression", "squeeze", "benign")

    model: str = Field(description="a .pt2 path, package.module:factory, or a registered name")
    weights: str | None = Field(
        default=None, description="safetensors or state dict, factories only"
    )
    model_id: str | None = Field(default=None, description="the registered model, via the API")
    profile_id: str | None = Field(default=None, description="a screening job: score with it")
    queue: Literal["extract", "screen"] = Field(
        default="extract", description="`screen` for one-sample, low-latency jobs"
    )
    layers: tuple[str, ...] = Field(min_length=1)
    inputs: tuple[str, ...] = Field(min_length=1)
    batch_size: int = Field(default=32, ge=1, le=4096)
    dtype: Dtype = "float16"
    compression: Compression | None = Field(
        default=None, description="the codec of the job's arrays; None: the host's default"
    )
    channels: tuple[int, ...] | None = Field(default=None, description="keep these channels only")
    top_k: int | None = Field(default=None, ge=1, description="keep each sample's k strongest")
    max_size: tuple[int, int] | None = Field(default=None, description="downsample to at most HxW")
    preprocessing: Preprocessing | None = Field(default=None, description="overrides the model's")
    labels_csv: str | None = None
    labels_from_dirs: bool = False
    input_kind: InputKind | None = Field(
        default=None, description="overrides the kind of input the model declares"
    )
    gradcam: tuple[str, ...] = Field(
        default=(), description="also store each sample's Grad-CAM map at these layers"
    )
    gradcam_target: str = Field(
        default="pred",
        min_length=1,
        max_length=512,
        description="the class Grad-CAM explains: pred, label, or a class (name or index)",
    )
    squeeze: bool = Field(
        default=False,
        description="also store each sample's feature-squeezing distances (screening)",
    )
    benign: bool = Field(
        default=False,
        description="also store benign copies' pooled activations and logits (a screening "
        "profile's reference)",
    )
    tenant: str = "local"
    roots: tuple[str, ...] | None = Field(
        default=None,
        description="a tenant's job: inputs are opened beneath these folders, no link "
        "followed; None for a trusted local job",
    )

    @field_validator("layers", "gradcam")
    @classmethod
    def _dedupe(cls, layers: tuple[str, ...]) -> tuple[str, ...]:
        # Asking for a layer twice captures it once.
        return tuple(dict.fromkeys(layers))

    @field_validator("channels")
    @classmethod
    def _channels(cls, channels: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if channels is None:
            return None
        if not channels or min(channels) < 0 or len(set(channels)) != len(channels):
            raise ValueError("channels must be distinct non-negative indices")
        return channels

    @model_validator(mode="after")
    def _exclusive(self) -> Self:
        if self.channels is not None and self.top_k is not None:
            raise ValueError("choose either channels or top_k, not both")
        if self.labels_csv and self.labels_from_dirs:
            raise ValueError("choose either labels_csv or labels_from_dirs, not both")
        if self.max_size is not None and min(self.max_size) < 1:
            raise ValueError("max_size must be positive")
        return self


def gradcam_class(spec: ExtractionSpec, info: ModelInfo) -> int | None:
    """The class index Grad-CAM explains for every sample, or None when it is each sample's
    own (`pred` or `label`). A class is a name the model declares, else an index; ValueError
    names the known ones."""
    target = spec.gradcam_target
    if target in ("pred", "label"):
        return None
    prep = spec.preprocessing or info.preprocessing
    names = prep.classes if prep.classes is not None else info.preprocessing.classes
    if names is not None and target in names:
        return names.index(target)
    if target.isdigit() and int(target) < info.classes:
        return int(target)
    known = f"one of {', '.join(names)}" if names else f"an index below {info.classes}"
    raise ValueError(
        f"Grad-CAM target {target!r} is not a class of {info.name}; use pred, label or {known}"
    )


def cap_spatial(shape: tuple[int, ...], max_size: tuple[int, int]) -> tuple[int, ...]:
    """Cap the last two spatial dimensions at max_size (the last one only for 1-d outputs)."""
    caps = (*(shape[:-2] if len(shape) > 2 else ()), *max_size[-len(shape[-2:]) :])
    return tuple(min(s, c) for s, c in zip(shape, caps, strict=True))


def stored_shape(output_shape: tuple[int, ...], spec: ExtractionSpec) -> tuple[int, ...]:
    """The per-sample shape of `acts` for a layer output of `output_shape` under `spec`."""
    width, spatial = output_shape[0], output_shape[1:]
    if spec.channels is not None:
        width = len(spec.channels)
    elif spec.top_k is not None:
        width = spec.top_k
    if spec.max_size is not None and spatial:
        spatial = cap_spatial(spatial, spec.max_size)
    return (width, *spatial)


@dataclass(frozen=True)
class Source:
    """One sample: its stable id and where its bytes are."""

    id: str
    path: str


@dataclass(frozen=True)
class Listing:
    """A job's samples as listed and labelled at submission, in row order, with the class
    names its labels index (None: the labels are the model's output indices). The plan
    stores it as given, so planning opens no input."""

    sources: list[Source]
    labels: list[int]
    classes: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.sources):
            raise ValueError(f"{len(self.labels)} labels for {len(self.sources)} samples")
