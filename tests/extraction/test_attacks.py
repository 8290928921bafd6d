"""FGSM and PGD: adversarial copies for calibrating screening, within budget, model untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

from workers.demo.digits import PREPROCESSING
from workers.errors import SpecError
from workers.extraction.attacks import fgsm, normaliser, pgd

EPS = 0.1


def normalise(x: Tensor) -> Tensor:
    return (x - 0.3) / 0.4


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Sequential, Tensor, Tensor]:
    """A small MLP with BatchNorm trained on sklearn's 8 x 8 digits (pixels scaled to [0, 1]),
    in training mode, and 200 digits it was trained on."""
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(30):
        optimiser.zero_grad()
        loss = F.cross_entropy(model(normalise(x)), y)
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    return model, x[:200], y[:200]


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(normalise(x)), y).item()
    model.train(was)
    return loss


def test_fgsm_stays_within_eps_and_the_pixel_range_and_raises_the_loss(
    trained: tuple[nn.Sequential, Tensor, Tensor],
) -> None:
    model, x, y = trained
    adv = fgsm(model, x, y, EPS, normalise)
    assert adv.shape == x.shape
    assert (adv - x).abs().max() <= EPS + 1e-6
    assert adv.min() >= 0.0
    assert adv.max() <= 1.0
    assert not adv.requires_grad
    assert _loss(model, adv, y) > _loss(model, x, y) + 0.5


def test_pgd_stays_within_eps_and_is_at_least_as_strong_as_fgsm(
    trained: tuple[nn.Sequential, Tensor, Tensor],
) -> None:
    model, x, y = trained
    generator = torch.Generator().manual_seed(0)
    adv = pgd(model, x, y, EPS, EPS / 4, 10, normalise, generator=generator)
    assert (adv - x).abs().max() <= EPS + 1e-6
    assert adv.min() >= 0.0
    assert adv.max() <= 1.0
    assert _loss(model, adv, y) >= _loss(model, fgsm(model, x, y, EPS, normalise), y)


def test_pgd_is_reproducible_with_a_seeded_generator(
    trained: tuple[nn.Sequential, Tensor, Tensor],
) -> None:
    model, x, y = trained
    first = pgd(model, x, y, EPS, 0.02, 3, normalise, generator=torch.Generator().manual_seed(1))
    again = pgd(model, x, y, EPS, 0.02, 3, normalise, generator=torch.Generator().manual_seed(1))
    other = pgd(model, x, y, EPS, 0.02, 3, normalise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    fixed = pgd(model, x, y, EPS, 0.02, 3, normalise, random_start=False)
    assert torch.equal(fixed, pgd(model, x, y, EPS, 0.02, 3, normalise, random_start=False))


def test_the_model_is_left_as_found(trained: tuple[nn.Sequential, Tensor, Tensor]) -> None:
    model, x, y = trained
    model.train()
    model[4].eval()
    model[1].bias.requires_grad_(False)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    try:
        fgsm(model, x, y, EPS, normalise)
        pgd(model, x, y, EPS, 0.02, 3, normalise)
        # BatchNorm's running statistics would move if the attack ran in training mode.
        after = model.state_dict()
        assert all(torch.equal(before[name], after[name]) for name in before)
        assert [m.training for m in model] == [True, True, True, True, False]
        assert [p.requires_grad for p in model.parameters()] == [True, False] + [True] * 4
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.train()
        model[1].bias.requires_grad_(True)


def test_attacks_work_inside_the_pipelines_inference_mode(
    trained: tuple[nn.Sequential, Tensor, Tensor],
) -> None:
    model, x, y = trained
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        adv = pgd(model, xi, yi, EPS, 0.02, 2, normalise, random_start=False)
    assert (adv - x).abs().max() > 0


def test_images_outside_the_unit_box_or_a_negative_budget_are_refused(
    trained: tuple[nn.Sequential, Tensor, Tensor],
) -> None:
    model, x, y = trained
    with pytest.raises(SpecError, match=r"\[0, 1\]"):
        fgsm(model, normalise(x), y, EPS)
    with pytest.raises(SpecError, match="eps"):
        fgsm(model, x, y, -0.1)
    with pytest.raises(SpecError, match="steps"):
        pgd(model, x, y, EPS, 0.01, 0)


def test_the_normaliser_applies_a_models_declared_mean_and_std() -> None:
    x = torch.rand(2, 1, 28, 28)
    expected = (x - 0.1307) / 0.3081
    torch.testing.assert_close(normaliser(PREPROCESSING)(x), expected)
