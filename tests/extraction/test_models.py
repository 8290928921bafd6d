"""Model loading: .pt2 archives, factories with weights, refusals, the layer catalogue."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from workers.demo.digits import PREPROCESSING, WEIGHTS, DigitsNet
from workers.errors import LayerError, ModelError
from workers.extraction.hooks import capture
from workers.extraction.models import PREPROCESSING_FILE, LoadedModel, conv_weights, load_model
from workers.jobs import Preprocessing

FACTORY = "workers.demo.digits:digits_cnn"
LAYERS = ["conv1", "block1.conv1", "block1", "block2.bn2", "conv3", "flatten", "fc"]
# Distinct from the bundled model's, so we know which declaration was read.
INSIDE = Preprocessing(size=(28, 28), channels=1, mean=(0.5,), std=(0.25,))
BESIDE = Preprocessing(size=(28, 28), channels=1, mean=(0.2,), std=(0.4,))


def images(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=generator)


def extract(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with capture(model, LAYERS) as forward:
        return forward(x)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def digits() -> LoadedModel:
    """The bundled model, eager, with its trained weights."""
    return load_model("digits-cnn")


@pytest.fixture(scope="module")
def dynamic_program(digits: LoadedModel) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch")
    return torch.export.export(digits.module, (images(4),), dynamic_shapes=({0: batch},))


@pytest.fixture(scope="module")
def frozen_program(digits: LoadedModel) -> torch.export.ExportedProgram:
    return torch.export.export(digits.module, (images(4),))


def save_archive(
    program: torch.export.ExportedProgram, path: Path, inside: Preprocessing | None = INSIDE
) -> Path:
    extra = {PREPROCESSING_FILE: inside.model_dump_json()} if inside else None
    torch.export.save(program, path, extra_files=extra)
    return path


# --- .pt2 archives --------------------------------------------------------------------------


def test_a_dynamic_batch_archive_keeps_dotted_layer_names_hookable(
    tmp_path: Path, digits: LoadedModel, dynamic_program: torch.export.ExportedProgram
) -> None:
    loaded = load_model(str(save_archive(dynamic_program, tmp_path / "digits.pt2")))
    assert loaded.info.format == "pt2"
    assert loaded.info.frozen_batch is None
    x = images(6, seed=1)
    logits, captured = extract(loaded.module, x)
    eager_logits, eager = extract(digits.module, x)
    assert list(captured) == LAYERS
    for name in LAYERS:
        assert captured[name].shape == eager[name].shape, name
        torch.testing.assert_close(captured[name], eager[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, eager_logits, rtol=0, atol=1e-5)


def test_an_archive_catalogue_has_the_eager_types_shapes_and_receptive_fields(
    tmp_path: Path, digits: LoadedModel, dynamic_program: torch.export.ExportedProgram
) -> None:
    loaded = load_model(str(save_archive(dynamic_program, tmp_path / "digits.pt2")))
    info = loaded.info
    assert info.layer("block1.conv1").type == "Conv2d"
    assert info.layer("block1").type == "Residual"
    assert info.layer("fc").type == "Linear"
    assert info.layer_names() == digits.info.layer_names()
    assert info.layers == digits.info.layers
    assert info.classes == 10


def test_an_archive_reads_its_preprocessing_from_its_extra_files(
    tmp_path: Path,
    dynamic_program: torch.export.ExportedProgram,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = save_archive(dynamic_program, tmp_path / "digits.pt2", inside=INSIDE)
    with caplog.at_level(logging.WARNING, logger="actmap"):
        loaded = load_model(str(path))
    assert loaded.info.preprocessing == INSIDE
    assert "preprocessing" not in caplog.text


def test_an_archive_reads_its_preprocessing_from_a_sidecar_file(
    tmp_path: Path,
    dynamic_program: torch.export.ExportedProgram,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = save_archive(dynamic_program, tmp_path / "digits.pt2", inside=None)
    (tmp_path / "digits.preprocessing.json").write_text(BESIDE.model_dump_json())
    with caplog.at_level(logging.WARNING, logger="actmap"):
        loaded = load_model(str(path))
    assert loaded.info.preprocessing == BESIDE
    assert "preprocessing" not in caplog.text


def test_preprocessing_given_on_the_command_line_overrides_the_archives(
    tmp_path: Path, dynamic_program: torch.export.ExportedProgram
) -> None:
    path = save_archive(dynamic_program, tmp_path / "digits.pt2", inside=INSIDE)
    assert load_model(str(path), preprocessing=BESIDE).info.preprocessing == BESIDE


def test_an_archive_declaring_no_preprocessing_gets_its_input_shape_and_a_warning(
    tmp_path: Path,
    dynamic_program: torch.export.ExportedProgram,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = save_archive(dynamic_program, tmp_path / "digits.pt2", inside=None)
    with caplog.at_level(logging.WARNING, logger="actmap"):
        loaded = load_model(str(path))
    assert loaded.info.preprocessing == Preprocessing(size=(28, 28), channels=1)
    assert "declares no preprocessing" in caplog.text


def test_a_frozen_batch_archive_runs_any_batch_in_slices_and_warns_once(
    tmp_path: Path,
    digits: LoadedModel,
    frozen_program: torch.export.ExportedProgram,
    caplog: pytest.LogCaptureFixture,
) -> None:
    loaded = load_model(str(save_archive(frozen_program, tmp_path / "naive.pt2")))
    assert loaded.info.frozen_batch == 4
    with caplog.at_level(logging.WARNING, logger="actmap"), capture(loaded.module, LAYERS) as fwd:
        exact = loaded.run(fwd, images(4, seed=2))
        assert not caplog.records
        ten = loaded.run(fwd, images(10, seed=3))
        seven = loaded.run(fwd, images(7, seed=4))
    for x, (logits, captured) in (
        (images(4, 2), exact),
        (images(10, 3), ten),
        (images(7, 4), seven),
    ):
        eager_logits, eager = extract(digits.module, x)
        torch.testing.assert_close(logits, eager_logits, rtol=0, atol=1e-5)
        for name in LAYERS:
            assert captured[name].shape == eager[name].shape, name
            torch.testing.assert_close(captured[name], eager[name], rtol=0, atol=1e-5)
    warnings = [r for r in caplog.records if r.name == "actmap" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "frozen batch size of 4" in message
    assert "Dim" in message


def test_the_fingerprint_of_an_archive_is_the_sha256_of_its_bytes(
    tmp_path: Path, dynamic_program: torch.export.ExportedProgram
) -> None:
    path = save_archive(dynamic_program, tmp_path / "digits.pt2")
    assert load_model(str(path)).info.sha256 == sha256(path)


# --- refusals ---------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates a directory: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_a_pickled_whole_model_is_refused_with_how_to_export_it(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(DigitsNet(), path)
    with pytest.raises(ModelError, match="pickled") as caught:
        load_model(str(path))
    assert "torch.export" in str(caught.value)


def test_a_pickled_whole_model_given_as_weights_is_refused_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(DigitsNet(), path)
    with pytest.raises(ModelError, match="pickled") as caught:
        load_model(FACTORY, weights=str(path))
    assert "torch.export" in str(caught.value)


def test_a_pickled_file_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.pt"
    torch.save(Payload(marker), path)
    with pytest.raises(ModelError):
        load_model(str(path))
    with pytest.raises(ModelError):
        load_model(FACTORY, weights=str(path))
    assert not marker.exists()


def test_a_state_dict_given_as_the_model_says_to_use_a_factory_with_weights(
    tmp_path: Path,
) -> None:
    path = tmp_path / "weights.pt"
    torch.save(DigitsNet().state_dict(), path)
    with pytest.raises(ModelError, match="weights only") as caught:
        load_model(str(path))
    assert "package.module:factory" in str(caught.value)
    assert f"--weights {path}" in str(caught.value)


# --- factories and weights ----------------------------------------------------------------------


def test_safetensors_and_state_dict_weights_give_identical_logits(tmp_path: Path) -> None:
    state_path = tmp_path / "digits.pt"
    torch.save(load_file(str(WEIGHTS)), state_path)
    from_safetensors = load_model(FACTORY, weights=str(WEIGHTS))
    from_state = load_model(FACTORY, weights=str(state_path))
    x = images(5)
    with torch.no_grad():
        a, b = from_safetensors.module(x), from_state.module(x)
    assert torch.equal(a, b)
    assert from_safetensors.info.sha256 == sha256(WEIGHTS)
    assert from_state.info.sha256 == sha256(state_path)
    assert from_safetensors.info.preprocessing == PREPROCESSING
    # The weights were really loaded: an untrained model gives other logits.
    with torch.no_grad():
        assert not torch.allclose(a, DigitsNet().eval()(x))


def test_weights_of_the_wrong_shape_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "five_classes.safetensors"
    save_file(DigitsNet(classes=5).state_dict(), str(path))
    with pytest.raises(ModelError, match="do not fit") as caught:
        load_model(FACTORY, weights=str(path))
    assert "fc.weight" in str(caught.value)


def test_weights_missing_a_tensor_are_refused_naming_it(tmp_path: Path) -> None:
    state = load_file(str(WEIGHTS))
    del state["fc.bias"]
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError, match="do not fit") as caught:
        load_model(FACTORY, weights=str(path))
    assert "fc.bias" in str(caught.value)


def test_a_factory_off_the_allow_list_is_refused_before_it_is_imported() -> None:
    with pytest.raises(ModelError, match="allow-list"):
        load_model(FACTORY, weights=str(WEIGHTS), factories=["other.module:net"])
    with pytest.raises(ModelError, match="allow-list"):
        load_model("actmap_no_such_module:net", factories=[])
    assert "actmap_no_such_module" not in sys.modules
    allowed = load_model(FACTORY, weights=str(WEIGHTS), factories=[FACTORY])
    assert allowed.info.format == "factory"


def test_a_registered_name_loads_the_bundled_weights(digits: LoadedModel) -> None:
    assert digits.info.sha256 == sha256(WEIGHTS)
    assert digits.info.preprocessing == PREPROCESSING
    assert not digits.module.training


# --- the catalogue ------------------------------------------------------------------------------


def test_the_digits_catalogue_has_receptive_fields_shapes_and_parameter_counts(
    digits: LoadedModel,
) -> None:
    info = digits.info
    fields = {
        "conv1": ((3, 3), (1, 1)),
        "block1.conv1": ((5, 5), (1, 1)),
        "block1": ((7, 7), (1, 1)),
        "conv2": ((9, 9), (2, 2)),
        "block2": ((17, 17), (2, 2)),
        "conv3": ((21, 21), (4, 4)),
    }
    for name, (size, stride) in fields.items():
        layer = info.layer(name)
        assert (layer.receptive_field, layer.rf_stride) == (size, stride), name
    for name in ("pool", "flatten", "fc"):
        assert info.layer(name).receptive_field is None, name
        assert info.layer(name).rf_stride is None, name
    shapes = {
        "conv1": (16, 28, 28),
        "block1": (16, 28, 28),
        "conv2": (32, 14, 14),
        "block2": (32, 14, 14),
        "conv3": (64, 7, 7),
        "pool": (64, 1, 1),
        "flatten": (64,),
        "fc": (10,),
    }
    for name, shape in shapes.items():
        assert info.layer(name).output_shape == shape, name
    modules = dict(DigitsNet().named_modules())
    assert info.layer_names() == [n for n in modules if n]
    for layer in info.layers:
        expected = sum(p.numel() for p in modules[layer.name].parameters())
        assert layer.params == expected, layer.name
    assert info.layer("conv1").params == 16 * 1 * 3 * 3 + 16
    assert info.classes == 10


class PoolNet(nn.Module):
    """A conv with a non-square kernel, a max pool, a dilated conv, a strided conv, an avg pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 4, (3, 5))
        self.pool = nn.MaxPool2d(2)
        self.conv_b = nn.Conv2d(4, 4, 3, dilation=2)
        self.conv_c = nn.Conv2d(4, 4, 3, stride=(2, 1))
        self.avg = nn.AvgPool2d(3, stride=1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 5 * 10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avg(self.conv_c(self.conv_b(self.pool(self.conv_a(x)))))
        out: torch.Tensor = self.fc(self.flatten(x))
        return out


class Conv1dNet(nn.Module):
    """Reads the image as one sequence of pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 5)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.flatten(self.pool(self.conv(x.flatten(2)))))
        return out


class Conv3dNet(nn.Module):
    """Reads the image as a volume one slice deep."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, (1, 3, 3))
        self.bn = nn.BatchNorm3d(4)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.bn(self.conv(x.unsqueeze(2))))
        out: torch.Tensor = self.fc(self.flatten(x))
        return out


@pytest.fixture
def nets(monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of test factories, importable as `name:factory` for the duration of a test."""
    module = types.ModuleType("actmap_test_nets")
    module.pool_net = PoolNet  # type: ignore[attr-defined]
    module.conv1d_net = Conv1dNet  # type: ignore[attr-defined]
    module.conv3d_net = Conv3dNet  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


def test_receptive_fields_follow_pools_dilations_and_strides_per_dimension(nets: str) -> None:
    loaded = load_model(f"{nets}:pool_net", preprocessing=Preprocessing(size=(40, 40), channels=1))
    info = loaded.info
    # size grows by (kernel - 1) * dilation * jump; the jump multiplies by the stride.
    expected = {
        "conv_a": ((3, 5), (1, 1)),  # 1 + 2, 1 + 4
        "pool": ((4, 6), (2, 2)),  # 3 + 1, 5 + 1; jump 2
        "conv_b": ((12, 14), (2, 2)),  # 4 + 2*2*2, 6 + 2*2*2
        "conv_c": ((16, 18), (4, 2)),  # 12 + 2*2, 14 + 2*2; jump (4, 2)
        "avg": ((24, 22), (4, 2)),  # 16 + 2*4, 18 + 2*2
    }
    for name, field in expected.items():
        layer = info.layer(name)
        assert (layer.receptive_field, layer.rf_stride) == field, name
    assert info.layer("avg").output_shape == (4, 5, 10)
    assert info.layer("fc").receptive_field is None
    assert info.classes == 3


def test_flat_layers_are_catalogued_with_one_dimensional_shapes(
    digits: LoadedModel, nets: str
) -> None:
    for name, width in (("flatten", 64), ("fc", 10)):
        layer = digits.info.layer(name)
        assert layer.output_shape == (width,)
        assert layer.flat
    assert not digits.info.layer("conv3").flat
    pool = load_model(f"{nets}:pool_net", preprocessing=Preprocessing(size=(40, 40), channels=1))
    assert pool.info.layer("flatten").output_shape == (200,)
    assert pool.info.layer("fc").output_shape == (3,)
    _, captured = extract(digits.module, images(3))
    assert captured["flatten"].shape == (3, 64)
    assert captured["fc"].shape == (3, 10)


# --- conv weights -------------------------------------------------------------------------------


def test_conv_weights_are_out_in_kernel_for_a_conv2d(digits: LoadedModel) -> None:
    weights = conv_weights(digits, "block2.conv1")
    assert weights.shape == (32, 32, 3, 3)
    assert weights.device.type == "cpu"
    assert not weights.requires_grad
    assert torch.equal(weights, load_file(str(WEIGHTS))["block2.conv1.weight"])
    assert conv_weights(digits, "conv1").shape == (16, 1, 3, 3)


def test_conv_weights_of_an_archive_equal_the_eager_ones(
    tmp_path: Path, digits: LoadedModel, dynamic_program: torch.export.ExportedProgram
) -> None:
    loaded = load_model(str(save_archive(dynamic_program, tmp_path / "digits.pt2")))
    assert torch.equal(conv_weights(loaded, "conv2"), conv_weights(digits, "conv2"))


def test_conv_weights_work_for_conv1d_and_conv3d_layers(nets: str) -> None:
    prep = Preprocessing(size=(8, 8), channels=1)
    one = load_model(f"{nets}:conv1d_net", preprocessing=prep)
    three = load_model(f"{nets}:conv3d_net", preprocessing=prep)
    assert conv_weights(one, "conv").shape == (4, 1, 5)
    assert conv_weights(three, "conv").shape == (4, 1, 1, 3, 3)
    assert torch.equal(conv_weights(three, "conv"), three.module.get_parameter("conv.weight"))


@pytest.mark.parametrize(("layer", "kind"), [("fc", "Linear"), ("bn1", "BatchNorm2d")])
def test_conv_weights_of_a_non_conv_layer_are_refused(
    digits: LoadedModel, layer: str, kind: str
) -> None:
    with pytest.raises(LayerError, match="not a conv layer") as caught:
        conv_weights(digits, layer)
    assert f"{layer!r} is a {kind}" in str(caught.value)


def test_conv_weights_of_an_unknown_layer_are_refused(digits: LoadedModel) -> None:
    with pytest.raises(LayerError, match="unknown layer 'conv9'"):
        conv_weights(digits, "conv9")


def test_editing_the_returned_conv_weights_leaves_the_model_unchanged() -> None:
    loaded = load_model("digits-cnn")
    before = loaded.module.get_parameter("conv1.weight").detach().clone()
    weights = conv_weights(loaded, "conv1")
    weights -= weights.min()  # a caller's in-place display scaling
    assert torch.equal(loaded.module.get_parameter("conv1.weight").detach(), before)
