"""Reductions before the copy to the host: channel subsets, top-k, downsampling, dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workers.errors import LayerError
from workers.extraction.reduce import Reduction, quantise
from workers.storage.quantised import decode, encode


@pytest.fixture
def output() -> torch.Tensor:
    """A conv layer's output: 4 samples, 10 channels, 12 x 9."""
    torch.manual_seed(0)
    return torch.randn(4, 10, 12, 9)


def test_a_channel_subset_keeps_exactly_those_channels_in_the_asked_order(
    output: torch.Tensor,
) -> None:
    reduced = Reduction(channels=(7, 0, 3), dtype=torch.float32)("conv", output)
    assert reduced.acts.shape == (4, 3, 12, 9)
    for position, channel in enumerate((7, 0, 3)):
        assert torch.equal(reduced.acts[:, position], output[:, channel])
    assert reduced.top_index is None


def test_a_channel_subset_of_flat_outputs_keeps_those_features() -> None:
    flat = torch.randn(5, 6)
    reduced = Reduction(channels=(5, 1), dtype=torch.float32)("fc", flat)
    assert torch.equal(reduced.acts, flat[:, [5, 1]])


@pytest.mark.parametrize("channels", [(10,), (0, 3, 42)])
def test_a_channel_out_of_range_is_refused_naming_the_layer(
    output: torch.Tensor, channels: tuple[int, ...]
) -> None:
    with pytest.raises(LayerError, match=r"channel \d+ .*'block2'.* 10"):
        Reduction(channels=channels)("block2", output)


def test_top_k_keeps_each_samples_strongest_channels_by_spatial_mean(
    output: torch.Tensor,
) -> None:
    reduced = Reduction(top_k=3, dtype=torch.float32)("conv", output)
    means = output.numpy().mean(axis=(2, 3))
    expected = np.argsort(-means, axis=1, kind="stable")[:, :3]
    assert reduced.top_index is not None
    assert reduced.top_index.shape == (4, 3)
    np.testing.assert_array_equal(reduced.top_index.numpy(), expected)
    assert reduced.acts.shape == (4, 3, 12, 9)
    for sample in range(4):
        for rank, channel in enumerate(expected[sample]):
            assert torch.equal(reduced.acts[sample, rank], output[sample, channel])
    # The samples do not all share one ranking, or the gather would not be tested.
    assert len({tuple(row) for row in expected}) > 1


def test_top_k_of_flat_outputs_keeps_each_samples_largest_features() -> None:
    torch.manual_seed(1)
    flat = torch.randn(3, 8)
    reduced = Reduction(top_k=2, dtype=torch.float32)("fc", flat)
    expected = np.argsort(-flat.numpy(), axis=1, kind="stable")[:, :2]
    assert reduced.top_index is not None
    np.testing.assert_array_equal(reduced.top_index.numpy(), expected)
    np.testing.assert_array_equal(
        reduced.acts.numpy(), np.take_along_axis(flat.numpy(), expected, axis=1)
    )


def test_top_k_wider_than_the_layer_is_refused(output: torch.Tensor) -> None:
    with pytest.raises(LayerError, match=r"top_k=11 .*'conv'.* 10"):
        Reduction(top_k=11)("conv", output)


def test_downsampling_equals_adaptive_average_pooling_to_the_capped_size(
    output: torch.Tensor,
) -> None:
    reduced = Reduction(max_size=(5, 16), dtype=torch.float32)("conv", output)
    assert reduced.acts.shape == (4, 10, 5, 9)
    expected = F.adaptive_avg_pool2d(output, (5, 9))
    torch.testing.assert_close(reduced.acts, expected, rtol=0, atol=0)
    assert not torch.equal(reduced.acts[:, :, :, 0], output[:, :, :5, 0])


def test_downsampling_applies_to_the_kept_channels_only(output: torch.Tensor) -> None:
    reduced = Reduction(channels=(2, 8), max_size=(4, 3), dtype=torch.float32)("conv", output)
    expected = F.adaptive_avg_pool2d(output[:, [2, 8]], (4, 3))
    torch.testing.assert_close(reduced.acts, expected, rtol=0, atol=0)


def test_downsampling_is_a_no_op_when_the_output_is_already_small(output: torch.Tensor) -> None:
    reduced = Reduction(max_size=(12, 9), dtype=torch.float32)("conv", output)
    assert torch.equal(reduced.acts, output)
    reduced = Reduction(max_size=(64, 64), dtype=torch.float32)("conv", output)
    assert torch.equal(reduced.acts, output)


def test_one_dimensional_outputs_are_capped_by_the_last_value() -> None:
    torch.manual_seed(2)
    sequence = torch.randn(2, 3, 50)
    reduced = Reduction(max_size=(4, 16), dtype=torch.float32)("conv1d", sequence)
    assert reduced.acts.shape == (2, 3, 16)
    torch.testing.assert_close(reduced.acts, F.adaptive_avg_pool1d(sequence, 16), rtol=0, atol=0)
    short = Reduction(max_size=(4, 64), dtype=torch.float32)("conv1d", sequence)
    assert torch.equal(short.acts, sequence)


def test_three_dimensional_outputs_keep_depth_and_cap_height_and_width() -> None:
    torch.manual_seed(3)
    volume = torch.randn(2, 3, 5, 12, 10)
    reduced = Reduction(max_size=(4, 4), dtype=torch.float32)("conv3d", volume)
    assert reduced.acts.shape == (2, 3, 5, 4, 4)
    torch.testing.assert_close(
        reduced.acts, F.adaptive_avg_pool3d(volume, (5, 4, 4)), rtol=0, atol=0
    )


def test_flat_outputs_are_not_downsampled() -> None:
    flat = torch.randn(3, 100)
    reduced = Reduction(max_size=(2, 2), dtype=torch.float32)("fc", flat)
    assert torch.equal(reduced.acts, flat)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_acts_are_stored_in_the_asked_dtype(output: torch.Tensor, dtype: torch.dtype) -> None:
    reduced = Reduction(dtype=dtype)("conv", output)
    assert reduced.acts.dtype == dtype
    assert torch.equal(reduced.acts, output.to(dtype))


def test_the_default_storage_dtype_is_float16(output: torch.Tensor) -> None:
    assert Reduction()("conv", output).acts.dtype == torch.float16


@pytest.mark.parametrize(
    "reduction",
    [
        Reduction(),
        Reduction(channels=(1, 4), dtype=torch.float16),
        Reduction(top_k=2, max_size=(3, 3), dtype=torch.float32),
    ],
    ids=["default", "channels", "top-k-downsampled"],
)
def test_pooled_is_the_float32_spatial_mean_of_all_channels(
    output: torch.Tensor, reduction: Reduction
) -> None:
    reduced = reduction("conv", output)
    assert reduced.pooled.dtype == torch.float32
    assert reduced.pooled.shape == (4, 10)
    torch.testing.assert_close(reduced.pooled, output.mean(dim=(2, 3)))


def test_pooled_is_float32_for_a_float16_output(output: torch.Tensor) -> None:
    half = output.half()
    reduced = Reduction(dtype=torch.float16)("conv", half)
    assert reduced.pooled.dtype == torch.float32
    torch.testing.assert_close(reduced.pooled, half.float().mean(dim=(2, 3)))


def test_pooled_of_flat_outputs_is_the_output_itself() -> None:
    flat = torch.randn(3, 7)
    reduced = Reduction(channels=(0,), dtype=torch.float16)("fc", flat)
    assert reduced.pooled.dtype == torch.float32
    assert torch.equal(reduced.pooled, flat)


def _decoded(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> np.ndarray:
    n = q.shape[0]
    return decode(q.numpy(), np.tile(scale.numpy(), (n, 1)), np.tile(offset.numpy(), (n, 1)))


def test_uint8_levels_decode_within_half_a_step_of_each_channel(output: torch.Tensor) -> None:
    reduced = Reduction(dtype=torch.uint8)("conv", output)
    assert reduced.acts.dtype == torch.uint8
    assert reduced.scale is not None
    assert reduced.offset is not None
    assert int(reduced.acts.max()) <= 254
    error = np.abs(_decoded(reduced.acts, reduced.scale, reduced.offset) - output.numpy())
    bound = reduced.scale.numpy()[None, :, None, None] / 2
    assert (error <= bound * (1 + 1e-5) + 1e-7).all()
    np.testing.assert_allclose(reduced.offset.numpy(), output.amin(dim=(0, 2, 3)).numpy())


def test_uint8_of_a_constant_channel_has_scale_zero_and_decodes_exactly(
    output: torch.Tensor,
) -> None:
    output[:, 4] = 2.5
    q, scale, offset = quantise(output)
    assert scale[4] == 0
    assert (_decoded(q, scale, offset)[:, 4] == 2.5).all()


def test_uint8_marks_values_that_are_not_finite_and_scales_the_rest(
    output: torch.Tensor,
) -> None:
    output[1] = float("nan")
    output[2, 3, 0, 0] = float("inf")
    q, scale, offset = quantise(output)
    assert (q[1] == 255).all()
    assert q[2, 3, 0, 0] == 255
    assert torch.isfinite(scale).all()
    decoded = _decoded(q, scale, offset)
    assert np.isnan(decoded[1]).all()
    good = np.isfinite(output.numpy())
    assert np.isfinite(decoded[good]).all()


def test_uint8_on_the_device_and_on_the_host_agree(output: torch.Tensor) -> None:
    q, scale, offset = quantise(output)
    q_host, scale_host, offset_host = encode(output.numpy())
    np.testing.assert_allclose(scale.numpy(), scale_host, rtol=1e-6)
    np.testing.assert_array_equal(offset.numpy(), offset_host)
    # Rounding a value that sits on a half step may go either way in float32.
    assert np.abs(q.numpy().astype(int) - q_host.astype(int)).max() <= 1


def test_uint8_keeps_post_relu_zeros_at_level_zero_so_they_decode_to_exactly_zero(
    output: torch.Tensor,
) -> None:
    # Runs of zeros are most of what zstd saves on 8-bit maps (tests/bench/README.md).
    relu = torch.relu(output)
    zeros = (relu == 0).numpy()
    for q, scale, offset in (quantise(relu), tuple(map(torch.from_numpy, encode(relu.numpy())))):
        assert (q.numpy()[zeros] == 0).all()
        assert (_decoded(q, scale, offset)[zeros] == 0).all()
