"""Plan a job: check the spec against the model's catalogue and create every array with its
final shape, holding the samples and labels its caller listed. Torch-free and opening no
input, so the API can plan without a worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.errors import LayerError, SampleCode, SpecError
from workers.jobs import (
    VERSION,
    ExtractionSpec,
    JobState,
    Listing,
    ModelInfo,
    close_matches,
    gradcam_class,
    host_compression,
    new_id,
    now,
    stored_shape,
)
from workers.storage.chunks import put_rows
from workers.storage.consolidate import publish
from workers.storage.layout import LABEL, SAMPLE, SOURCE, LayerLayout, create_job, writable
from workers.storage.squeezed import screen_extras

__all__ = ["Plan", "layouts", "plan"]


@dataclass(frozen=True)
class Plan:
    store: str
    job_id: str
    n_samples: int
    batch_size: int

    @property
    def n_batches(self) -> int:
        return -(-self.n_samples // self.batch_size)


def layouts(spec: ExtractionSpec, info: ModelInfo) -> list[LayerLayout]:
    known = info.layer_names()
    found = []
    for name in spec.layers:
        if name not in known:
            raise LayerError(f"unknown layer {name!r} in {info.name}; {close_matches(name, known)}")
        if info.layer(name).calls > 1:
            raise LayerError(
                f"layer {name!r} of {info.name} runs {info.layer(name).calls} times in one "
                "forward pass, and a job stores one output per layer; choose a module called "
                "once (`actmap layers` shows the calls) or give each call a module of its own"
            )
        out = info.layer(name).output_shape
        width = out[0]
        if spec.channels is not None and max(spec.channels) >= width:
            raise SpecError(
                f"channel {max(spec.channels)} asked of layer {name!r}, which has {width}"
            )
        if spec.top_k is not None and spec.top_k > width:
            raise SpecError(f"top_k={spec.top_k} asked of layer {name!r}, which has {width}")
        dim = "rank" if spec.top_k else "kept_channel" if spec.channels else "channel"
        shape = stored_shape(out, spec)
        cam = _gradcam_shape(info, name, shape) if name in spec.gradcam else None
        found.append(LayerLayout(name, shape, width, spec.dtype, dim, spec.channels, cam))
    _check_gradcam(spec, info)
    return found


def _gradcam_shape(info: ModelInfo, name: str, stored: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample shape of a layer's Grad-CAM map: the layer's own resolution."""
    out = info.layer(name).output_shape
    if len(out) < 2:
        raise SpecError(
            f"layer {name!r} of {info.name} is flat {out}: Grad-CAM needs a layer with "
            "spatial maps, such as the last conv layer"
        )
    if stored[1:] != out[1:]:
        # The maps share the layer's y and x dimensions with `acts`, so both keep one size.
        raise SpecError(
            f"--max-size shrinks layer {name!r} below its resolution {out[1:]}, where "
            "Grad-CAM is stored; drop --max-size or choose Grad-CAM layers within it"
        )
    return out[1:]


def _check_gradcam(spec: ExtractionSpec, info: ModelInfo) -> None:
    """Grad-CAM layers are among the requested ones and its target is a class."""
    for name in spec.gradcam:
        if name not in spec.layers:
            known = info.layer_names()
            hint = close_matches(name, known) if name not in known else "add it to --layers"
            raise LayerError(
                f"Grad-CAM layer {name!r} is not among the job's layers ({hint}): its "
                "activations are stored beside its maps"
            )
    if not spec.gradcam:
        if spec.gradcam_target != "pred":
            raise SpecError("--target chooses the class Grad-CAM explains: give --gradcam LAYER")
        return
    try:
        gradcam_class(spec, info)
    except ValueError as exc:
        raise SpecError(str(exc)) from None


def plan(
    store: str,
    spec: ExtractionSpec,
    info: ModelInfo,
    inputs: Listing,
    job_id: str | None = None,
) -> Plan:
    """Check the spec against the catalogue and create every array, with the samples and
    labels of `inputs` (listed by the caller: `extraction.inputs.list_inputs`)."""
    found = layouts(spec, info)
    if spec.compression is None:  # a caller that knows no host: the GPU host's default
        spec = spec.model_copy(update={"compression": host_compression(gpu=True)})
    sources, labels, classes = inputs.sources, inputs.labels, inputs.classes
    job_id = job_id or new_id()
    attrs: dict[str, Any] = {
        "kind": "extraction",
        "spec": spec.model_dump(mode="json"),
        "state": JobState.QUEUED.value,
        "tenant": spec.tenant,
        "model": {"name": info.name, "format": info.format, "sha256": info.sha256},
        "catalogue": info.model_dump(mode="json"),
        "n_samples": len(sources),
        "batch_size": spec.batch_size,
        "n_batches": -(-len(sources) // spec.batch_size),
        "classes": classes,
        "error_codes": SampleCode.table(),
        "created": now(),
        "actmap_version": VERSION,
    }
    n = len(sources)
    more = None
    if spec.squeeze or spec.benign:
        channels = {layer.name: layer.channels for layer in found}
        more = screen_extras(spec.squeeze, spec.benign, info.classes, channels)
    group = create_job(
        store, job_id, attrs, n, spec.batch_size, info.classes, found,
        spec.compression or "zstd", more,
    )  # fmt: skip
    # Whole chunks written directly: through zarr's event loop these three writes took most
    # of the plan's time.
    put_rows(writable(group, SAMPLE), 0, np.asarray([s.id for s in sources], dtype=object))
    put_rows(writable(group, SOURCE), 0, np.asarray([s.path for s in sources], dtype=object))
    put_rows(writable(group, LABEL), 0, np.asarray(labels, dtype=np.int32))
    publish(store, job_id)
    return Plan(store, job_id, n, spec.batch_size)
