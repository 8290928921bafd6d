"""The report's Grad-CAM part: a section per layer scanned with `--gradcam`, showing for
the representative samples the map over the input beside the maps of the channels that
overlap it most (the measure of `actmap explain`, workers/analysis/overlap.py)."""

from __future__ import annotations

import numpy as np

from workers.analysis.overlap import MEASURE, overlap, top_channels
from workers.pictures.html import Raw, Section, e, figure
from workers.pictures.overlay import gradcam_sheet
from workers.pictures.render import activation_sheet
from workers.pictures.report_job import ReportJob
from workers.storage.layout import GRADCAM, GRADCAM_TARGET

__all__ = ["TOP_CHANNELS", "gradcam_sections"]

TOP_CHANNELS = 4  # channel maps drawn beside each overlay


def _sample(job: ReportJob, layer: str, row: int, role: str, images: dict[str, bytes]) -> str:
    target = int(np.asarray(job.layer(layer, GRADCAM_TARGET)[row]))
    if target < 0:
        return f"<p>{e(role)}: <code>{e(job.sample(row))}</code> has no Grad-CAM map.</p>"
    cam = np.asarray(job.layer(layer, GRADCAM)[row], dtype=np.float32)
    stored = next(s for s in job.stored() if s.name == layer)
    maps = stored.maps(row)
    image = job.input_image(row)
    title = f"{layer} of {job.sample(row)}: evidence for class {job.class_name(target)}"
    parts = [figure(images, f"gradcam-{role}-{layer}.png", gradcam_sheet(cam, image, title).png(),
                    f"Grad-CAM at {layer} for class {job.class_name(target)}")]  # fmt: skip
    if maps is not None and maps.shape[1:] == cam.shape:
        found = overlap(maps[None], cam[None])
        best = top_channels(found.correlation, min(TOP_CHANNELS, maps.shape[0]))[0]
        ids = stored.ids(row)
        scores = ", ".join(f"{int(ids[c])} (r = {found.correlation[0, c]:.2f})" for c in best)
        sheet = activation_sheet(maps, None, channels=[int(c) for c in best], channel_ids=ids,
                                 title=f"{layer}: the channels closest to the map")  # fmt: skip
        parts.append(figure(images, f"gradcam-top-{role}-{layer}.png", sheet.png(),
                            f"channels {scores}"))  # fmt: skip
    head = f"<h3>{e(role)}: <code>{e(job.sample(row))}</code></h3><p>{e(job.verdict(row))}.</p>"
    return head + '<div class="figures">' + "".join(parts) + "</div>"


def gradcam_sections(job: ReportJob) -> list[Section]:
    """One section per Grad-CAM layer of the job (none when it has none)."""
    layers = [s.name for s in job.stored() if GRADCAM in s.group]
    picks, _ = job.representatives()
    sections = []
    for layer in layers:
        images: dict[str, bytes] = {}
        intro = Raw(
            "<p>Where the model looked: each sample's Grad-CAM map for the class named, "
            "in viridis (dark: no evidence, yellow: the strongest) over the input in grey, "
            f"beside the maps of the channels that overlap it most; {e(MEASURE)}.</p>"
        )
        body = "".join(_sample(job, layer, p.row, p.role, images) for p in picks)
        sections.append(Section(f"Grad-CAM: {layer}", intro + (body or "<p>No sample ran.</p>"),
                                images))  # fmt: skip
    return sections
