"""Request and response bodies of the HTTP API (`/v1`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers.jobs import ModelInfo

__all__ = [
    "Accepted",
    "AnalysisOut",
    "ComparisonRequest",
    "ExtractionRequest",
    "InputSet",
    "JobAnalysisRequest",
    "JobOut",
    "ModelOut",
    "Problem",
    "ProfileRequest",
    "SampleErrors",
    "SamplesPage",
    "ScreenAnswer",
    "ScreenPage",
    "ScreeningRequest",
    "StoreLocation",
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Request(_Body):
    """A request body: types as they are (no `true` for a number, no "yes" for a flag)."""

    model_config = ConfigDict(extra="forbid", strict=True)


# What reaches a path on disk or in the store: no NUL byte, no path in an id.
ServerPath = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")]
Name = Annotated[str, Field(min_length=1, max_length=512, pattern=r"^[^\x00]+$")]
Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Channel = Annotated[int, Field(ge=0)]
Side = Annotated[int, Field(ge=1, le=65_536)]


class ExtractionRequest(_Request):
    model_id: Id = Field(description="a model registered by this tenant")
    layers: list[Name] = Field(min_length=1, max_length=64)
    inputs: list[ServerPath] = Field(
        default_factory=list, max_length=10_000, description="server paths inside your roots"
    )
    input_set: Id | None = Field(default=None, description="an id from POST /v1/inputs")
    batch_size: int = Field(default=32, ge=1, le=4096)
    dtype: Literal["float16", "float32", "uint8"] = Field(
        default="float16", description="uint8: per-channel scale and offset per batch"
    )
    compression: Literal["zstd", "lz4", "none"] = Field(
        default="zstd", description="the codec of every array the job writes"
    )
    channels: list[Channel] | None = Field(
        default=None, min_length=1, max_length=4096, json_schema_extra={"uniqueItems": True}
    )
    top_k: int | None = Field(default=None, ge=1, le=4096)
    # A JSON array is a tuple here: strict mode would refuse it as one otherwise.
    max_size: tuple[Side, Side] | None = Field(default=None, strict=False)
    labels_from_dirs: bool = False
    queue: Literal["extract", "screen"] = Field(
        default="extract", description="`screen` for one-sample, low-latency requests"
    )
    gradcam: list[Name] = Field(
        default_factory=list, max_length=64, description="Grad-CAM maps at these layers"
    )
    gradcam_target: Name = Field(
        default="pred", description="the class Grad-CAM explains: pred, label or a class"
    )
    squeeze: bool = Field(
        default=False, description="also store each sample's feature-squeezing distances"
    )
    benign: bool = Field(
        default=False,
        description="also store benign copies' pooled activations and logits (a screening "
        "profile's reference)",
    )

    @model_validator(mode="after")
    def _some_inputs(self) -> ExtractionRequest:
        if not self.inputs and self.input_set is None:
            raise ValueError("give inputs (server paths) or an input_set from POST /v1/inputs")
        if self.channels is not None and len(set(self.channels)) != len(self.channels):
            raise ValueError("channels repeat; give each channel index once")
        return self


class Selection(_Request):
    job_id: Id
    labels: list[int] | None = None
    predictions: list[int] | None = None
    correct: bool | None = None
    samples: list[Name] | None = Field(default=None, max_length=100_000)


class ComparisonRequest(_Request):
    """Two populations: two jobs, or two subsets of one."""

    a: Selection
    b: Selection
    layers: list[Name] | None = Field(default=None, max_length=64)
    paired: bool = False


class ScreeningRequest(_Request):
    """A screening job: extract INPUTs on the `screen` queue and score them with a profile."""

    profile_id: Id
    inputs: list[ServerPath] = Field(default_factory=list, max_length=10_000)
    input_set: Id | None = None

    @model_validator(mode="after")
    def _some_inputs(self) -> ScreeningRequest:
        if not self.inputs and self.input_set is None:
            raise ValueError("give inputs (server paths) or an input_set from POST /v1/inputs")
        return self


class JobAnalysisRequest(_Request):
    """Filter health or family signatures of one job."""

    job_id: Id
    layers: list[Name] | None = Field(default=None, max_length=64)


class ExplainRequest(_Request):
    """Per sample, the channels whose maps overlap its Grad-CAM map most; per class, the
    channels most often among them."""

    job_id: Id
    layer: Name
    top: int = Field(default=5, ge=1, le=64)


class AtlasRequest(_Request):
    """Each channel's strongest responses at one layer of a job, with their input crops."""

    job_id: Id
    layer: Name
    top: int = Field(default=9, ge=1, le=256, description="responses kept per channel")


class ProfileRequest(_Request):
    """Fit a screening profile on a clean, labelled reference job."""

    reference_job: Id
    layers: list[Name] | None = Field(default=None, max_length=64)
    fpr: float = Field(default=0.05, gt=0, lt=0.5)
    held_out: float = Field(
        default=0.25,
        gt=0,
        lt=1,
        description="share of each class held out to learn the combination and place the "
        "threshold (more on a reference too small for fpr)",
    )
    adversarial_job: Id | None = None
    detectors: list[str] | None = Field(
        default=None,
        max_length=32,
        description="default: mahalanobis, knn, lid and margin, and squeeze on a reference "
        "scanned with squeezing (msp and energy on request)",
    )
    combine: Literal["fisher", "weighted", "max", "mean"] = "fisher"


class AnalysisOut(_Body):
    analysis_id: str
    kind: str
    state: str
    reason: str | None = None
    summary: dict[str, object] = Field(default_factory=dict)


class Problem(_Body):
    """Every error answer: one line saying what to do, and the field errors for a 422."""

    detail: str
    errors: list[dict[str, object]] | None = None


class Accepted(_Body):
    job_id: str
    state: str
    n_samples: int
    queue: str


class SampleErrors(_Body):
    n_failed: int
    by_code: dict[str, int]
    examples: list[dict[str, str]]


class JobOut(_Body):
    job_id: str
    kind: str
    state: str
    model_id: str | None
    layers: list[str]
    n_samples: int
    n_batches: int
    batches_done: int
    samples_done: int
    samples_per_s: float | None
    eta_s: float | None
    created: str
    finished: str | None
    elapsed_s: float | None
    reason: str | None
    errors: SampleErrors


class ModelOut(_Body):
    id: str
    name: str
    state: Literal["pending", "ready", "failed"]
    error: str | None
    created: str
    catalogue: ModelInfo | None


class InputSet(_Body):
    input_set: str
    files: int
    bytes: int


class SamplesPage(_Body):
    samples: list[str]
    offset: int
    total: int


class ScreenPage(_Body):
    """A page of a screening job's answers: each sample's score (null where it failed) and
    whether it is above the profile's threshold."""

    profile_id: str | None
    threshold: float | None
    fpr: float | None
    n_flagged: int
    samples: list[str]
    scores: list[float | None]
    flags: list[bool]
    offset: int
    total: int


class ScreenAnswer(_Body):
    """One sample screened now: its score, whether it is above the profile's threshold
    (flagged), and the model's prediction. Nothing is stored."""

    profile_id: str
    sample: str
    score: float
    flag: bool
    threshold: float
    fpr: float
    pred: int
    pred_class: str | None


class StoreLocation(_Body):
    store: str
    group: str
