"""The static HTML report of one job: `index.html` and `img/*.png`, offline, every picture
linked relatively, so the folder can be zipped, mailed or served as it is.

Owns the page: which sections there are and in what order, the representative samples
(a correct, a misclassified and a low-confidence one) and the place comparisons plug in
(`sections`, see `comparison_section`). The job is read through report_job.py; the
pictures come from render.py and charts.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from workers.analysis.compare import Comparison
from workers.analysis.health import FilterHealth, duplicate_filters
from workers.jobs import AnalysisKind
from workers.pictures.charts import bar_chart, difference_sheet, score_histogram
from workers.pictures.html import Raw, Section, e, facts, figure, page, table
from workers.pictures.render import Scale, activation_sheet, filter_sheet
from workers.pictures.report_job import Pick, ReportJob, health
from workers.storage.analyses import analysis_ids, open_analysis
from workers.storage.layout import attrs, layer_path, read
from workers.storage.stored_job import StoredLayer

__all__ = ["REPORT_TOP", "Section", "comparison_section", "stored_comparisons", "write_report"]

REPORT_TOP = 64  # tiles per activation grid in the report; the API draws up to 256
MAX_ROWS = 256  # rows of a per-channel table


def _listed(ids: np.ndarray, limit: int = 12) -> str:
    if ids.size == 0:
        return "none"
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return shown + (f" (+{ids.size - limit} more)" if ids.size > limit else "")


def _overview(job: ReportJob) -> Section:
    rows = [
        ("state", job.state + (f": {job.reason}" if job.reason else "")),
        ("samples", f"{job.n} ({job.n_failed} failed)"),
        ("accuracy on labelled samples", job.accuracy or "labels unknown"),
        ("layers stored", ", ".join(layer.name for layer in job.layers_stored) or "none"),
        ("store", Raw(f"<code>{e(job.store)}</code>, group <code>jobs/{e(job.id)}</code>")),
    ]
    body = facts(rows) + Raw(
        "<p>How to read the pictures: each tile is one filter's response map, scaled on its "
        "own from black (its lowest value) to white (its highest), so bright regions are where "
        "that filter responds most strongly; a black tile responded the same everywhere. Early "
        "layers pick up edges and strokes, deeper ones larger patterns. Open the numbers with "
        f"<code>xarray.open_datatree({e(repr(f'{job.store}/jobs/{job.id}'))}, "
        "engine='zarr')</code>.</p>"
    )
    return Section("Overview", body)


def _input_shape(prep: Mapping[str, object] | None) -> str:
    if not prep:
        return "?"
    size = prep.get("size")
    shape = " x ".join(map(str, size)) if isinstance(size, list | tuple) else "?"
    return f"{prep.get('channels', '?')} channel(s), {shape}"


def _model(job: ReportJob) -> Section:
    m = job.model
    rows = [
        ("name", m.get("name", "?")),
        ("format", m.get("format", "?")),
        ("sha256 fingerprint", Raw(f"<code>{e(m.get('sha256', '?'))}</code>")),
        ("classes", job.n_classes),
        ("input", _input_shape(job.preprocessing)),
    ]
    layer_rows = [
        (
            r["name"],
            r["type"],
            r.get("output_shape"),
            r.get("params", ""),
            r.get("receptive_field") or "-",
            r.get("rf_stride") or "-",
            job.stored_shape(r["name"]),
        )  # fmt: skip
        for r in job.catalogue
    ]
    layers = table(
        ("layer", "type", "output shape", "params", "receptive field", "rf stride", "stored"),
        layer_rows,
        "layers",
    )
    opened = " open" if len(layer_rows) <= 40 else ""
    body = facts(rows) + Raw(
        f"<details{opened}><summary>{len(layer_rows)} layers with their receptive fields "
        f"(the stored ones marked)</summary>{layers}</details>"
    )
    return Section("Model", body)


def _timings(job: ReportJob) -> Section:
    size = job.attrs.get("batch_size", "-")
    rows = [
        ("created", job.attrs.get("created", "-")),
        ("finished", job.attrs.get("finished", "-")),
        ("elapsed", f"{job.elapsed_s:.2f} s" if job.elapsed_s is not None else "-"),
        ("throughput", f"{job.samples_per_s:.1f} samples/s" if job.samples_per_s else "-"),
        ("batches", f"{job.attrs.get('n_batches', '-')} of up to {size} samples"),
    ]
    body = str(facts(rows))
    if job.n_failed:
        counts = ", ".join(f"{k}: {v}" for k, v in job.failures_by_code().items())
        failed = f"{job.n_failed} sample{'s' if job.n_failed > 1 else ''} failed"
        body += f"<p>{failed} ({e(counts)}); the first of them:</p>"
        body += table(("sample", "code", "message"), job.failures(20))
    else:
        body += "<p>Every sample was read and run.</p>"
    return Section("Timings and errors", body)


def _health_rows(layer: StoredLayer, h: FilterHealth) -> Raw:
    ids = layer.stored_ids()
    flags = [
        ", ".join(
            n.replace("_", " ") for n in ("dead", "always_on", "saturated") if getattr(h, n)[i]
        )
        for i in range(ids.size)
    ]
    order = np.argsort([0 if f else 1 for f in flags], kind="stable")[:MAX_ROWS]
    rows = [
        (int(ids[i]), f"{h.mean[i]:.4g}", f"{h.max[i]:.4g}", f"{100 * h.apoz[i]:.1f}%", flags[i])
        for i in order
    ]
    more = (
        f" (the first {MAX_ROWS} of {ids.size}, flagged ones first)" if ids.size > MAX_ROWS else ""
    )
    return Raw(
        f"<details><summary>{e(layer.name)}: every channel{e(more)}</summary>"
        + table(("channel", "mean", "max", "sparsity", "verdict"), rows)
        + "</details>"
    )


def _health(job: ReportJob) -> Section:
    summary: list[tuple[object, ...]] = []
    details: list[str] = []
    for layer in job.layers_stored:
        h, source = health(layer, job.ok)
        if h is None:
            summary.append((layer.name, source, "-", "-", "-", "-", "-"))
            continue
        ids = layer.stored_ids()
        saturated = _listed(ids[h.saturated]) if h.extreme_rate is not None else "n/a"
        summary.append(
            (
                layer.name,
                source,
                ids.size,
                _listed(ids[h.dead]),
                _listed(ids[h.always_on]),
                saturated,
                f"{100 * float(np.median(h.apoz)):.1f}%",
            )  # fmt: skip
        )
        details.append(_health_rows(layer, h))
    head = ("layer", "from", "channels", "dead", "always on", "saturated", "median sparsity")
    body = table(head, summary, "health") + Raw(
        "<p>Dead: never above zero on any sample (a dying ReLU, a bad initialisation). "
        "Always on: above zero at 99% of positions or more. Saturated: at its ceiling half "
        "the time, judged only for bounded activations (ReLU6, sigmoid, tanh). Sparsity: the "
        "share of positions at or below zero (APoZ); high is selective, low is dense.</p>"
    )
    return Section("Filter health", body + "".join(details))


def _sample(job: ReportJob, pick: Pick, images: dict[str, bytes], scale: Scale) -> str:
    image = job.input_image(pick.row)
    head = (
        f"<h3>{e(pick.role)}: <code>{e(job.sample(pick.row))}</code></h3><p>{e(pick.why)}; "
        f"{e(job.verdict(pick.row))}."
        + ("" if image is not None else " (The input file could not be read here.)")
        + "</p>"
    )
    parts = []
    for layer in job.grid_layers():
        acts = layer.maps(pick.row)
        if acts is None:
            continue
        top = REPORT_TOP if acts.shape[0] > REPORT_TOP else None
        title = f"{layer.name} of {job.sample(pick.row)}"
        sheet = activation_sheet(
            acts, image, top=top, channel_ids=layer.ids(pick.row), title=title, scale=scale
        )
        name = f"acts-{pick.role}-{layer.name}.png"
        field = job.receptive_field(layer.name)
        caption = f"{layer.name}{f' ({field})' if field else ''}: {sheet.note}"
        parts.append(figure(images, name, sheet.png(), caption))
    probs = job.probabilities(pick.row)
    if probs is not None:
        best = np.argsort(-probs, kind="stable")[:10]
        png = bar_chart([job.class_name(int(c)) for c in best], probs[best], "", "probability")
        parts.append(
            figure(images, f"probs-{pick.role}.png", png, "the most likely classes (softmax)")
        )
    return head + '<div class="figures">' + "".join(parts) + "</div>"


def _samples(job: ReportJob, scale: Scale) -> Section:
    images: dict[str, bytes] = {}
    picks, note = job.representatives()
    body = f"<p>{e(note)}</p>" if note else ""
    if not job.grid_layers():
        body += "<p>No stored layer has spatial maps; only pooled values were drawn.</p>"
    body += "".join(_sample(job, pick, images, scale) for pick in picks) or "<p>No sample ran.</p>"
    return Section("Representative samples", body, images)


def _filters(job: ReportJob, weights: np.ndarray | None) -> Section:
    layer = job.first_conv()
    found = weights if weights is not None else job.filters(layer)
    if layer is None or found is None:
        why = "the model has no conv layer" if layer is None else "the weights were not given"
        return Section(
            "Filter weights",
            f"<p>Not drawn: {why}. <code>actmap report</code> loads them from the model when "
            "torch is installed, and keeps them in the store for the API.</p>",
        )
    images: dict[str, bytes] = {}
    sheet = filter_sheet(found, "filter", title=f"{layer}: filter weights")
    body: str = figure(images, f"filters-{layer}.png", sheet.png(), f"{layer}: {sheet.note}")
    if found.ndim >= 3:
        dup = duplicate_filters(found, centre=True)
        groups = "; ".join(", ".join(map(str, g)) for g in dup.groups) or "none"
        body += Raw(f"<p>Near-duplicate filters (correlation above 0.95): {e(groups)}.</p>")
    return Section("Filter weights", body, images)


def _screening(job: ReportJob) -> Section | None:
    found = job.screening()
    if found is None:
        return None
    scores, flags, threshold = found
    images: dict[str, bytes] = {}
    png = score_histogram(scores, threshold, flags)
    where = "no threshold stored" if threshold is None else f"threshold {threshold:.4g}"
    body: str = figure(images, "screen-scores.png", png, f"screening scores ({where})")
    worst = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:10]
    rows = [
        (job.sample(int(i)), f"{scores[i]:.4g}", "yes" if flags is not None and flags[i] else "")
        for i in worst
    ]
    body += Raw("<p>The highest scores:</p>") + table(("sample", "score", "flagged"), rows)
    return Section("Screening", body, images)


def comparison_section(
    comparison: Comparison,
    layer: str,
    title: str = "Comparison",
    *,
    channel_ids: Sequence[int] | None = None,
    top: int = 20,
    differences: np.ndarray | None = None,
    difference_ids: Sequence[int] | None = None,
    pair: str = "",
) -> Section:
    """The hook for comparisons: A against B at one layer as a bar chart of the most
    discriminative filters (Cohen's d; `channel_ids` names the compared columns), and
    optionally one pair's difference maps (k, H, W) of channels `difference_ids`.
    Pass the result to `write_report(sections=...)`."""
    ids = np.arange(comparison.cohen_d.size) if channel_ids is None else np.asarray(channel_ids)
    ranked = comparison.ranked(top=top)
    note = f"{comparison.n_a} samples in A, {comparison.n_b} in B at {layer}"
    if ranked.size == 0:  # nothing significant: still show the largest effects, and say so
        ranked = np.argsort(-np.abs(np.nan_to_num(comparison.cohen_d)), kind="stable")[:top]
        note += "; no filter differs significantly (q <= 0.05), the largest effects shown"
    images: dict[str, bytes] = {}
    labels = [f"filter {int(ids[i])}" for i in ranked]
    png = bar_chart(labels, comparison.cohen_d[ranked], f"{title}: {layer}", "Cohen's d (A - B)")
    body = Raw(f"<p>{e(note)}.</p>") + figure(images, f"compare-{title}-{layer}.png", png, note)
    if differences is not None:
        sheet = difference_sheet(differences, channel_ids=difference_ids, title=pair)
        body += figure(images, f"diff-{title}-{layer}.png", sheet.png(), sheet.note)
    return Section(title, body, images)


def write_report(
    store: str,
    job_id: str,
    out_dir: Path,
    weights: np.ndarray | None = None,
    *,
    sections: Sequence[Section] = (),
    scale: Scale = "layer",
) -> Path:
    """Write `out_dir/index.html` and `out_dir/img/*.png` for the job and return the page.

    `weights` are the first conv layer's (out, in, *kernel), else the ones the store keeps;
    `sections` (comparisons, see `comparison_section`; atlases, see pictures/atlas.py)
    follow the job's own. `scale` draws the activation tiles on one range per layer (a
    silent filter stays dark), or with "tile" each on its own."""
    job = ReportJob(store, job_id)
    # Pictures first: what a reader opens the report for; the tables that explain them after.
    screening = _screening(job)
    parts = [
        _overview(job), _samples(job, scale),
        _filters(job, None if weights is None else np.asarray(weights)), _health(job),
        *([screening] if screening is not None else []), *sections,
        _model(job), _timings(job),
    ]  # fmt: skip
    folder = Path(out_dir) / "img"
    folder.mkdir(parents=True, exist_ok=True)
    written = {name: png for part in parts for name, png in part.images.items()}
    for old in folder.glob("*.png"):  # pictures of an earlier report of another job
        if old.name not in written:
            old.unlink()
    for name, png in written.items():
        (folder / name).write_bytes(png)
    title = f"actmap report: job {job.id}"
    subtitle = f"{job.model.get('name', '')}, {job.n} samples, {job.state}"
    footer = f"written by actmap {job.attrs.get('actmap_version', '')}"
    index = Path(out_dir) / "index.html"
    index.write_text(page(title, subtitle, footer, parts), encoding="utf-8")
    return index


def stored_comparisons(store: str, job_id: str) -> list[Section]:
    """A section per layer of every stored comparison that has this job on either side."""
    sections: list[Section] = []
    for analysis_id in analysis_ids(store):
        group = open_analysis(store, analysis_id)
        meta = attrs(group)
        inputs = meta.get("inputs", {})
        sides = [inputs.get(side, {}).get("job_id") for side in ("a", "b")]
        if meta.get("kind") != AnalysisKind.COMPARE or job_id not in sides:
            continue
        for layer in meta.get("layers", {}):
            names = ("mean_a", "mean_b", "cohen_d", "t", "df", "p", "q", "auroc")
            v = {name: read(group, layer_path(layer, name)) for name in names}
            found = Comparison(int(inputs["n_a"]), int(inputs["n_b"]), **v)
            title = f"Comparison {analysis_id}: A {sides[0]} against B {sides[1]}"
            sections.append(comparison_section(found, layer, title))
    return sections
