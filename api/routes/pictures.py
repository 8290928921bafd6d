"""The `/v1` picture routes: PNGs of a job's activation maps, filter weights and
screening scores, drawn by workers/pictures/, scoped to the caller's tenant
like every other job route (another tenant's job answers 404).

Filter weights come from the store (`actmap report` keeps the first conv layer's there)
or from the model's safetensors file, read with safetensors' numpy loader: the API never
imports torch, so other weight formats answer 404 with what to do instead.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import zarr
from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from api.auth import Tenant
from api.deps import OwnedAnalysis, OwnedJob, Services, ServicesDep, TenantDep, roots_of
from workers.errors import NotFound, SpecError
from workers.extraction.inputs import OutsideRoots, fd_path, opened
from workers.jobs import CONV_TYPES, close_matches
from workers.pictures.atlas import channel_png
from workers.pictures.charts import score_histogram
from workers.pictures.render import MAX_TILES, Scale, activation_grid, filter_grid
from workers.pictures.report_job import input_image
from workers.storage.layout import SAMPLE, SOURCE, attrs, read
from workers.storage.registry import Registry
from workers.storage.stored_job import StoredLayer, layer_group, read_filters, screening

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["pictures"])
_PNG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "a PNG picture"},
    401: {"description": "no or unknown bearer token"},
    404: {"description": "no such job, layer, sample or picture for this tenant"},
    422: {"description": "an invalid parameter, said in one line"},
}


def _png(content: bytes) -> Response:
    return Response(content, media_type="image/png")


def _row(group: zarr.Group, sample: str) -> int:
    found = np.flatnonzero(read(group, SAMPLE) == sample)
    if found.size == 0:
        raise NotFound(f"no sample {sample!r} in this job; see /samples")
    return int(found[0])


def _positions(stored: np.ndarray, wanted: str | None) -> list[int] | None:
    """Positions in the stored maps of the asked channel indices (the layer's own)."""
    if not wanted:
        return None
    where = {int(c): i for i, c in enumerate(stored)}
    asked = [int(c) for c in wanted.split(",") if c]
    missing = [c for c in asked if c not in where]
    if missing:
        raise SpecError(f"channel {missing[0]} is not stored for this sample and layer")
    return [where[c] for c in asked]


@router.get(
    "/jobs/{job_id}/layers/{layer}/activations.png", responses=_PNG, response_class=Response
)
def activations_png(
    services: ServicesDep,
    tenant: TenantDep,
    group: OwnedJob,
    layer: str,
    sample: Annotated[str, Query(max_length=4096, description="the sample id")],
    top: Annotated[int | None, Query(ge=1, le=MAX_TILES, description="strongest N")] = None,
    channels: Annotated[str | None, Query(max_length=20_000, pattern=r"^[0-9,]*$")] = None,
    image: Annotated[bool, Query(description="draw the input beside the maps")] = True,
    scale: Annotated[Scale, Query(description="one range for the layer, or per tile")] = "layer",
) -> Response:
    """One sample's maps at one layer: a tile per channel labelled with its index, all on
    the layer's one range with a bar (`scale=tile`: each on its own), the input beside
    them; at most 256 tiles."""
    job = attrs(group)
    types = {r["name"]: r["type"] for r in job.get("catalogue", {}).get("layers", [])}
    data = StoredLayer(layer, types.get(layer, ""), layer_group(group, layer))
    row = _row(group, sample)
    maps = data.maps(row)
    if maps is None:
        raise SpecError(f"layer {layer} has no spatial maps; GET its /pooled values instead")
    ids = data.ids(row)
    picture = None
    if image and SOURCE in group:
        prep = job.get("spec", {}).get("preprocessing") or job.get("catalogue", {}).get(
            "preprocessing"
        )
        source = str(read(group, SOURCE, slice(row, row + 1))[0])
        try:
            picture = input_image(source, prep, _job_roots(services, tenant, job))
        except OutsideRoots:
            raise NotFound(
                f"the input of sample {sample} is no longer a file inside your allowed roots; "
                "ask with image=false for the maps alone"
            ) from None
    png = activation_grid(
        maps, picture, _positions(ids, channels), top, f"{layer} of {sample}", channel_ids=ids,
        scale=scale,
    )  # fmt: skip
    return _png(png)


def _job_roots(services: Services, tenant: Tenant, job: dict[str, Any]) -> tuple[str, ...] | None:
    """The roots the job's inputs are opened beneath: those it stored, else (a job from
    before jobs stored them) the tenant's own; None only on the open local server."""
    stored = job.get("spec", {}).get("roots")
    return tuple(stored) if stored is not None else roots_of(services, tenant)


def _registry(services: Services, group: zarr.Group) -> tuple[str, ...] | None:
    """Where a job's weights may be read: its tenant's registry folder (a copy of what
    was registered), or anywhere on the open local server."""
    if services.tenants.open:
        return None
    return (str(Registry(services.store).root / str(attrs(group).get("tenant"))),)


def _weights(services: Services, group: zarr.Group, layer: str) -> np.ndarray:
    """The layer's weights from the store, else from the registered model's safetensors
    copy, opened beneath the registry (never a tenant's own path); 404 otherwise."""
    kept = read_filters(group, layer)
    if kept is not None:
        return kept
    path = str(attrs(group).get("spec", {}).get("weights") or "")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open  # numpy only, never torch

        try:
            with (
                opened(path, _registry(services, group)) as fd,
                safe_open(fd_path(fd), framework="numpy") as f,
            ):
                if f"{layer}.weight" in f.keys():  # noqa: SIM118 (not a dict)
                    return np.asarray(f.get_tensor(f"{layer}.weight"), dtype=np.float32)
        except (OSError, SafetensorError, OutsideRoots):  # answer the 404 below
            pass
    raise NotFound(
        "weights of this model are not readable without torch; "
        "`actmap report JOB` keeps the first conv layer's in the store"
    )


@router.get("/jobs/{job_id}/weights/{layer}.png", responses=_PNG, response_class=Response)
def weights_png(
    services: ServicesDep,
    group: OwnedJob,
    layer: str,
    over: Annotated[Literal["filter", "layer"], Query(description="normalise per")] = "filter",
    input_channel: Annotated[int | None, Query(ge=0)] = None,
) -> Response:
    """A conv layer's filters, normalised to [0, 1] per filter or over the layer; RGB for a
    first layer of 3 input channels, else the mean over inputs or `input_channel`."""
    rows = attrs(group).get("catalogue", {}).get("layers", [])
    convs = [r["name"] for r in rows if r.get("type") in CONV_TYPES]
    if layer not in convs:
        raise NotFound(f"no conv layer {layer!r} in this model; {close_matches(layer, convs)}")
    png = filter_grid(
        _weights(services, group, layer), over, input_channel, f"{layer}: filter weights"
    )
    return _png(png)


@router.get("/jobs/{job_id}/screen/scores.png", responses=_PNG, response_class=Response)
def screen_scores_png(group: OwnedJob, job_id: str) -> Response:
    """The histogram of a screening job's scores, flagged samples in red, the threshold
    dashed."""
    found = screening(group)
    if found is None:
        raise NotFound(f"job {job_id} is not a screening job: it has no scores")
    scores, flags, threshold = found
    return _png(score_histogram(scores, threshold, flags))


@router.get(
    "/analyses/{analysis_id}/channels/{channel}.png", responses=_PNG, response_class=Response
)
def atlas_channel_png(
    services: ServicesDep,
    analysis: OwnedAnalysis,
    channel: Annotated[int, Path(ge=0, le=1 << 20, description="the layer's channel index")],
    scale: Annotated[Scale, Query(description="the layer's range, or the channel's")] = "layer",
) -> Response:
    """One channel of an atlas: the input crops of its strongest responses, its filter
    weights (a first conv layer's, once `actmap report` kept them) and its maps."""
    return _png(channel_png(services.store, analysis.analysis_id, channel, scale))
