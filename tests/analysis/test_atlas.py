"""The filter atlas: receptive-field boxes against hand-computed ones, the streamed top-N
against a brute-force sort of the whole array, and a binary's byte offsets.

Jobs are real: planned and run in this process (tests/oracle.py) into a real Zarr store,
with the bundled digits model or the small test factories below.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from tests.oracle import planned, run_job
from workers.analysis.atlas import TopResponses, byte_spans, field_boxes
from workers.analysis.filter_atlas import run_atlas
from workers.demo.digits import WEIGHTS
from workers.errors import LayerError, SpecError
from workers.extraction.cache import ModelCache
from workers.extraction.models import load_model
from workers.jobs import ExtractionSpec, Preprocessing
from workers.storage.layout import open_job, read

DIGITS = "workers.demo.digits:digits_cnn"
SAMPLES = Path(__file__).parents[2] / "workers" / "demo" / "samples"
BINARY_PREP = Preprocessing(size=(32, 32), channels=1, scale=1 / 255, input_kind="binary")


class Stack(nn.Module):
    """conv_a 3x3 s1 p1, conv_b 3x3 s2 p0, pool 2x2 s2, conv_c 3x3 s1 p(1, 0)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv_a = nn.Conv2d(1, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 3, stride=2)
        self.pool = nn.MaxPool2d(2)
        self.conv_c = nn.Conv2d(4, 4, 3, padding=(1, 0))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_c(self.pool(self.conv_b(self.conv_a(x))))
        out: torch.Tensor = self.fc(y.mean(dim=(2, 3)))
        return out


class Brightness(nn.Module):
    """One 3x3 filter of ones (padding 1): it fires most where the bytes are brightest."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv1.weight.fill_(1.0)
        self.fc = nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.conv1(x).mean(dim=(2, 3)))
        return out


def stack_net() -> Stack:
    return Stack()


def brightness_net() -> Brightness:
    return Brightness()


stack_net.preprocessing = Preprocessing(size=(24, 24), channels=1)  # type: ignore[attr-defined]
brightness_net.preprocessing = BINARY_PREP  # type: ignore[attr-defined]


# --- receptive fields and boxes ----------------------------------------------------------------


def test_the_catalogue_records_where_each_field_starts_as_computed_by_hand() -> None:
    info = load_model("tests.analysis.test_atlas:stack_net").info
    # (size, stride, offset): size grows by (k - 1) * jump, the offset moves by -pad * jump.
    expected = {
        "conv_a": ((3, 3), (1, 1), (-1, -1)),
        "conv_b": ((5, 5), (2, 2), (-1, -1)),  # 3 + 2*1; no padding
        "pool": ((7, 7), (4, 4), (-1, -1)),  # 5 + 1*2
        "conv_c": ((15, 15), (4, 4), (-5, -1)),  # 7 + 2*4; padding 1 (y) and 0 (x), jump 4
    }
    for name, (size, stride, offset) in expected.items():
        layer = info.layer(name)
        assert (layer.receptive_field, layer.rf_stride, layer.rf_offset) == (size, stride, offset)
    assert info.layer("conv_c").output_shape == (4, 5, 3)


def test_a_box_at_the_border_reaches_into_the_padding_and_one_in_the_middle_does_not() -> None:
    size, stride, offset = (15, 15), (4, 4), (-5, -1)
    corner = field_boxes(np.array(0), np.array(0), size, stride, offset, (5, 3), (5, 3))
    middle = field_boxes(np.array(2), np.array(1), size, stride, offset, (5, 3), (5, 3))
    assert corner.tolist() == [-5, -1, 10, 14]  # top, left, bottom, right (exclusive)
    assert middle.tolist() == [3, 3, 18, 18]


def test_the_box_is_exactly_the_input_pixels_that_move_the_position() -> None:
    net = Stack().eval()
    for y, x in ((0, 0), (2, 1), (4, 2)):
        image = torch.randn(1, 1, 24, 24, requires_grad=True)
        out = net.conv_c(net.pool(net.conv_b(net.conv_a(image))))
        out[0, :, y, x].sum().backward()
        assert image.grad is not None
        ys, xs = np.nonzero(image.grad[0, 0].numpy())
        top, left, bottom, right = field_boxes(
            np.array(y), np.array(x), (15, 15), (4, 4), (-5, -1), (5, 3), (5, 3)
        ).tolist()
        # The box clipped to the image is the bounding box of the pixels with a gradient
        # (max pooling routes the gradient to one pixel per window, so it may be smaller).
        assert max(top, 0) <= ys.min()
        assert ys.max() < min(bottom, 24)
        assert max(left, 0) <= xs.min()
        assert xs.max() < min(right, 24)


def test_a_downsampled_position_sees_the_fields_of_every_position_it_averages() -> None:
    # block1 of the digits model: field 7, stride 1, offset -3; 28 positions averaged to 5.
    boxes = field_boxes(
        np.array([0, 4]), np.array([1, 2]), (7, 7), (1, 1), (-3, -3), (5, 5), (28, 28)
    )
    # y=0 averages rows 0..5: -3 .. 5 + 7 - 3; y=4 rows 22..27; x=1 columns 5..11; x=2 11..16.
    assert boxes.tolist() == [[-3, 2, 9, 15], [19, 8, 31, 20]]


def test_byte_spans_cover_the_rows_and_columns_a_box_stands_for() -> None:
    # 2048 bytes: 32 a row (under 10 KiB), 64 rows drawn at 32 x 32, so two rows a pixel.
    spans = byte_spans(np.array([[19, 9, 22, 12], [-1, -1, 2, 2], [40, 0, 50, 5]]), (32, 32), 2048)
    assert spans[0].tolist() == [38 * 32 + 9, 43 * 32 + 12, 32, 3]
    assert spans[1].tolist() == [0, 3 * 32 + 2, 32, 2]  # the padding covers no byte
    assert spans[2].tolist() == [-1, -1, -1, -1]  # wholly in the padding


# --- the streamed top-N ------------------------------------------------------------------------


def _brute_force(acts: np.ndarray, ok: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, each sample that ran at its largest value (the first position in row
    order on ties), sorted by value (largest first) then row; the first n values and
    (row, y, x)."""
    values, where = [], []
    rows = np.flatnonzero(ok)
    for c in range(acts.shape[1]):
        v = acts[rows, c].astype(np.float32).reshape(rows.size, -1)
        at = v.argmax(axis=1)
        best = v[np.arange(rows.size), at]
        order = np.lexsort((rows, -best))[:n]
        y, x = np.unravel_index(at[order], acts.shape[2:])
        values.append(best[order])
        where.append(np.stack([rows[order], y, x], axis=1))
    return np.asarray(values), np.asarray(where)


def test_top_responses_keep_ties_in_stream_order_block_by_block() -> None:
    top = TopResponses(2, 3, (1, 2))
    top.add(np.array([[[[1.0, 5.0]], [[0.0, 0.0]]]]))
    top.add(np.array([[[[5.0, 2.0]], [[0.0, 7.0]]], [[[5.0, 5.0]], [[0.0, 0.0]]]]))
    found = top.result()
    assert found.values.tolist() == [[5.0, 5.0, 5.0], [7.0, 0.0, 0.0]]
    assert found.sample.tolist() == [[0, 1, 2], [1, 0, 2]]
    assert found.x.tolist() == [[1, 0, 0], [1, 0, 0]]


def test_a_channel_shows_n_different_samples_not_one_sample_at_n_positions() -> None:
    top = TopResponses(1, 2, (2, 2))
    top.add(np.array([[[[9.0, 8.0], [7.0, 6.0]]], [[[1.0, 0.0], [0.0, 2.0]]]]))
    found = top.result()
    assert found.sample.tolist() == [[0, 1]]
    assert found.values.tolist() == [[9.0, 2.0]]
    assert (found.y.tolist(), found.x.tolist()) == ([[0, 1]], [[0, 1]])


def _layer(store: str, analysis: str, layer: str) -> xr.Dataset:
    """The atlas of `layer` as xarray opens it from the store."""
    node = xr.open_datatree(f"{store}/analyses/{analysis}", engine="zarr")[f"layers/{layer}"]
    assert isinstance(node, xr.DataTree)
    return node.to_dataset()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("atlas") / "store")


def _extract(store: str, inputs: list[str], model: str = DIGITS, **options: object) -> str:
    spec = ExtractionSpec.model_validate(
        {
            "model": model,
            "weights": str(WEIGHTS) if model == DIGITS else None,
            "inputs": inputs,
            "batch_size": 8,
            "dtype": "float16",
            "layers": ["block1", "conv3", "fc"],
            **options,
        }
    )
    models = ModelCache()
    job = planned(store, spec, models.get(spec).info)
    run_job(store, job.job_id, models, decode_threads=1)
    return job.job_id


@pytest.fixture(scope="module")
def digits_job(store: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    broken = tmp_path_factory.mktemp("broken") / "broken.png"
    broken.write_bytes(b"not a png")
    # 41 samples in batches of 8: six chunks, one sample failed (its maps are NaN).
    return _extract(store, [str(SAMPLES), str(broken)])


@pytest.mark.parametrize("block", [None, 3])
@pytest.mark.parametrize(("layer", "n"), [("block1", 64), ("conv3", 12)])
def test_the_atlas_equals_a_brute_force_top_n_over_the_whole_array(
    store: str, digits_job: str, layer: str, n: int, block: int | None
) -> None:
    group = open_job(store, digits_job, mode="r")
    acts = read(group, f"layers/{layer}/acts")
    ok = read(group, "error_code") == 0
    assert not ok.all()
    values, where = _brute_force(acts, ok, n)
    # float16 maps tie often: the order among equal values is part of what is checked.
    assert (np.diff(values, axis=1) == 0).any()
    analysis = run_atlas(store, digits_job, layer, n, block=block)
    tree = xr.open_datatree(f"{store}/analyses/{analysis}", engine="zarr")
    found = _layer(store, analysis, layer)
    np.testing.assert_array_equal(found["value"].values, values)
    got = np.stack([found["row"].values, found["y"].values, found["x"].values], axis=-1)
    np.testing.assert_array_equal(got, where)
    ids = read(group, "sample")
    assert found["sample_id"].values[0, 0] == ids[where[0, 0, 0]]
    assert tree.attrs["inputs"] == {"job_id": digits_job, "layer": layer, "top": n, "n_samples": 40}


def test_a_channel_subset_keeps_its_ids_and_downsampled_maps_map_back(store: str) -> None:
    job = _extract(store, [str(SAMPLES)], channels=[3, 5, 7], max_size=[5, 5])
    analysis = run_atlas(store, job, "block1", 2)
    found = _layer(store, analysis, "block1")
    assert found["channel"].values.tolist() == [3, 5, 7]
    y, x = found["y"].values, found["x"].values
    expected = field_boxes(y, x, (7, 7), (1, 1), (-3, -3), (5, 5), (28, 28))
    np.testing.assert_array_equal(found["crop"].values, expected)
    assert (found["crop"].values[..., 2] - found["crop"].values[..., 0] >= 7 + 5 - 1).all()
    acts = read(open_job(store, job, mode="r"), "layers/block1/acts")
    np.testing.assert_array_equal(
        found["value"].values, _brute_force(acts, np.ones(40, bool), 2)[0]
    )


def test_layers_the_atlas_cannot_map_are_refused_in_one_line(store: str, digits_job: str) -> None:
    with pytest.raises(SpecError, match=r"^layer 'fc' has no 2-d maps") as flat:
        run_atlas(store, digits_job, "fc")
    assert "\n" not in str(flat.value)
    top_k = _extract(store, [str(SAMPLES)], top_k=4)
    with pytest.raises(SpecError, match="top-k channels only; .* without top_k"):
        run_atlas(store, top_k, "block1")
    with pytest.raises(SpecError, match="top is 1 to 256"):
        run_atlas(store, digits_job, "block1", 0)
    with pytest.raises(LayerError, match="stores no layer 'conv9'"):
        run_atlas(store, digits_job, "conv9")


# --- binaries ----------------------------------------------------------------------------------


def test_a_binary_job_gives_the_byte_offsets_of_the_strongest_crop(
    store: str, tmp_path: Path
) -> None:
    folder = tmp_path / "bins"
    folder.mkdir()
    data = np.zeros((64, 32), np.uint8)  # 2048 bytes: 32 a row, two rows a model pixel
    data[40:42, 10:12] = 255  # model pixel row 20, columns 10 and 11
    (folder / "bright.bin").write_bytes(data.tobytes())
    (folder / "dark.bin").write_bytes(bytes(2048))
    job = _extract(
        store, [str(folder)], model="tests.analysis.test_atlas:brightness_net", layers=["conv1"]
    )
    analysis = run_atlas(store, job, "conv1", 1)
    found = _layer(store, analysis, "conv1")
    assert found["sample_id"].values[0, 0] == "bright.bin"
    y, x = int(found["y"].values[0, 0]), int(found["x"].values[0, 0])
    assert (y, x) in ((20, 10), (20, 11))
    assert found["crop"].values[0, 0].tolist() == [y - 1, x - 1, y + 2, x + 2]
    start, stop, stride, run = found["bytes"].values[0, 0].tolist()
    # Rows 2y-2 .. 2y+3 of the file, columns x-1 .. x+1: by hand for the pixel found.
    assert [start, stop, stride, run] == [(2 * y - 2) * 32 + x - 1, (2 * y + 3) * 32 + x + 2, 32, 3]
    covered = {start + k * stride + j for k in range(6) for j in range(run)}
    bright = {r * 32 + c for r in (40, 41) for c in (10, 11)}
    assert bright <= covered
