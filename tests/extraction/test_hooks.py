"""Hook capture: what a forward computes, detached, and a model always left as found."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

from workers.errors import LayerError
from workers.extraction.hooks import capture

LAYERS = ["conv1", "features.0.0", "features.0", "features.1", "head"]


class Net(nn.Module):
    """A conv, a Sequential nested two deep with BatchNorm, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
            nn.BatchNorm2d(8),
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(torch.relu(self.conv1(x)))
        out: torch.Tensor = self.head(x.mean(dim=(2, 3)))
        return out


class Tripwire(nn.Module):
    """Passes its input through, but raises `error` on a sample holding a NaN."""

    def __init__(self, error: type[BaseException]) -> None:
        super().__init__()
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.isnan(x).any():
            raise self.error("bad sample")
        return x


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, 2 * x


class Mapping(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": x}


class Guarded(nn.Module):
    """Net behind a tripwire, with a tuple- and a dict-returning module on the way."""

    def __init__(self, error: type[BaseException] = ValueError) -> None:
        super().__init__()
        self.gate = Tripwire(error)
        self.pair = Pair()
        self.mapping = Mapping()
        self.net = Net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pair(self.gate(x))[0]
        out: torch.Tensor = self.net(self.mapping(x)["out"])
        return out


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    bn = net.features[1]
    assert isinstance(bn, nn.BatchNorm2d)
    # Non-trivial running statistics, so eval-mode BatchNorm is not an identity.
    assert bn.running_mean is not None
    assert bn.running_var is not None
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return net


def by_hand(net: Net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's output computed module by module, in eval mode, on a copy without hooks."""
    net = copy.deepcopy(net).eval()
    with torch.no_grad():
        conv1 = net.conv1(x)
        stage = net.features[0]
        assert isinstance(stage, nn.Sequential)
        inner = stage[0](torch.relu(conv1))
        block = torch.relu(inner)
        bn = net.features[1](block)
        head = net.head(bn.mean(dim=(2, 3)))
    return {"conv1": conv1, "features.0.0": inner, "features.0": block, "features.1": bn,
            "head": head}  # fmt: skip


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def assert_left_as_found(model: Guarded, flags: dict[str, bool]) -> None:
    """No hook anywhere, every training flag as before, and a fresh extraction works."""
    assert hook_count(model) == 0
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert training_flags(model) == flags
    x = torch.randn(2, 3, 8, 8)
    expected = by_hand(model.net, x)
    with capture(model, ["net.conv1", "net.features.0.0"]) as forward:
        _, captured = forward(x)
    torch.testing.assert_close(captured["net.conv1"], expected["conv1"], rtol=0, atol=0)
    torch.testing.assert_close(captured["net.features.0.0"], expected["features.0.0"])
    assert hook_count(model) == 0


def good_then_bad(model: Guarded, layers: list[str]) -> None:
    """One good batch, then one holding a NaN that trips the gate inside the forward."""
    x = torch.randn(2, 3, 8, 8)
    with capture(model, layers) as forward:
        forward(x)
        assert hook_count(model) == len(layers)
        x[1, 0, 0, 0] = float("nan")
        forward(x)


def test_captured_outputs_equal_a_module_by_module_forward_for_nested_layers() -> None:
    net = make_net()
    x = torch.randn(3, 3, 8, 8)
    expected = by_hand(net, x)
    with capture(net, LAYERS) as forward:
        logits, captured = forward(x)
    assert list(captured) == LAYERS
    for name in LAYERS:
        assert captured[name].shape == expected[name].shape, name
        torch.testing.assert_close(captured[name], expected[name], rtol=0, atol=0)
    torch.testing.assert_close(logits, expected["head"], rtol=0, atol=0)


def test_a_layer_asked_for_twice_is_hooked_and_captured_once() -> None:
    net = make_net()
    x = torch.randn(2, 3, 8, 8)
    with capture(net, ["conv1", "features.0.0", "conv1"]) as forward:
        assert len(net.conv1._forward_hooks) == 1
        _, captured = forward(x)
    assert list(captured) == ["conv1", "features.0.0"]
    torch.testing.assert_close(captured["conv1"], by_hand(net, x)["conv1"], rtol=0, atol=0)


def test_outputs_are_detached_even_when_the_parameters_require_grad() -> None:
    net = make_net()
    assert all(p.requires_grad for p in net.parameters())
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with torch.enable_grad(), capture(net, LAYERS) as forward:
        _, captured = forward(x)
    for name, tensor in captured.items():
        assert not tensor.requires_grad, name
        assert tensor.grad_fn is None, name


def test_capture_works_under_inference_mode() -> None:
    net = make_net()
    x = torch.randn(2, 3, 8, 8)
    expected = by_hand(net, x)
    with torch.inference_mode(), capture(net, LAYERS) as forward:
        _, captured = forward(x)
    for name in LAYERS:
        torch.testing.assert_close(captured[name], expected[name], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_model_is_left_as_found_after_an_exception_inside_the_forward(mode: str) -> None:
    model = Guarded(ValueError)
    model.train(mode == "train")
    flags = training_flags(model)
    with pytest.raises(ValueError, match="bad sample"):
        good_then_bad(model, ["gate", "net.conv1", "net.features.0.0"])
    assert_left_as_found(model, flags)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_model_is_left_as_found_after_an_exception_inside_a_hook(mode: str) -> None:
    model = Guarded()
    model.train(mode == "train")
    flags = training_flags(model)
    with (
        pytest.raises(LayerError, match=r"'pair'.*tuple") as caught,
        capture(model, ["net.conv1", "pair"]) as forward,
    ):
        forward(torch.randn(2, 3, 8, 8))
    assert "not a tensor" in str(caught.value)
    assert_left_as_found(model, flags)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_model_is_left_as_found_after_a_keyboard_interrupt_inside_the_forward(
    mode: str,
) -> None:
    model = Guarded(KeyboardInterrupt)
    model.train(mode == "train")
    flags = training_flags(model)
    with pytest.raises(KeyboardInterrupt):
        good_then_bad(model, ["net.conv1", "net.features.1", "gate"])
    assert_left_as_found(model, flags)


def test_a_submodule_kept_in_eval_inside_a_training_model_stays_in_eval() -> None:
    model = Guarded()
    model.train()
    model.net.features[1].eval()  # a frozen BatchNorm while fine-tuning
    flags = training_flags(model)
    with capture(model, ["net.conv1"]) as forward:
        forward(torch.randn(2, 3, 8, 8))
    assert training_flags(model) == flags


def test_a_layer_returning_a_dict_is_refused_naming_the_layer() -> None:
    model = Guarded()
    with (
        pytest.raises(LayerError, match=r"'mapping'.*dict"),
        capture(model, ["mapping"]) as forward,
    ):
        forward(torch.randn(2, 3, 8, 8))
    assert hook_count(model) == 0


def test_an_unknown_layer_is_refused_with_close_matches() -> None:
    net = make_net()
    with pytest.raises(LayerError, match="conv_1") as caught, capture(net, ["head", "conv_1"]):
        pass
    message = str(caught.value)
    assert "close matches" in message
    assert "conv1" in message.split("close matches")[1]
    assert hook_count(net) == 0
    assert net.training


def test_a_thousand_extractions_leave_no_hooks_and_grow_no_objects() -> None:
    net = make_net()
    x = torch.randn(1, 3, 8, 8)
    counts: dict[int, int] = {}
    for i in range(1, 1001):
        with capture(net, LAYERS) as forward:
            _, captured = forward(x)
        assert hook_count(net) == 0
        del captured, forward
        if i in (100, 1000):
            gc.collect()
            counts[i] = len(gc.get_objects())
    assert not any(m._forward_hooks for m in net.modules())
    # 900 leaked handles, closures or captured tensors would add thousands of objects.
    assert counts[1000] - counts[100] < 100, counts
