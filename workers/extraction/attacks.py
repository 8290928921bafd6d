"""L-infinity adversarial attacks (FGSM, PGD) for calibrating and evaluating screening.

Owns making adversarial copies of images in [0, 1] pixel space: the model's own input
normalisation is a separate callable (`normaliser(preprocessing)` builds it from a model's
declared `Preprocessing`), so eps and the [0, 1] box mean pixels. The model is left exactly as
found: it runs in eval mode during the attack (BatchNorm statistics untouched), its per-module
training flags and its parameters' `requires_grad` are restored in `finally`, and gradients
are taken with `torch.autograd.grad` with respect to the input only, so no `.grad` accumulates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.errors import SpecError
from workers.jobs import Preprocessing

__all__ = ["fgsm", "normaliser", "pgd"]

Normalise = Callable[[Tensor], Tensor]


def fgsm(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, normalise: Normalise | None = None
) -> Tensor:
    """One signed-gradient step of size eps from x (Goodfellow et al. 2015), clamped to
    [0, 1]; a new detached tensor of x's shape."""
    _check(x, y, eps)
    with _attacking(model):
        x0 = x.detach().clone()
        return (x0 + eps * _loss_gradient(model, x0, y, normalise).sign()).clamp(0.0, 1.0)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    normalise: Normalise | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient descent (Madry et al. 2018): `steps` signed-gradient steps of size
    `alpha`, each projected back into the eps-ball around x and into [0, 1]; with
    `random_start`, from a uniform point of that ball (drawn from `generator`)."""
    _check(x, y, eps)
    if alpha <= 0 or steps < 1:
        raise SpecError(f"PGD needs alpha > 0 and steps >= 1, got alpha={alpha}, steps={steps}")
    with _attacking(model):
        x0 = x.detach().clone()
        adv = x0.clone()
        if random_start:
            noise = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            adv = (adv + (2.0 * noise - 1.0) * eps).clamp(0.0, 1.0)
        for _ in range(steps):
            adv = adv + alpha * _loss_gradient(model, adv, y, normalise).sign()
            adv = torch.minimum(torch.maximum(adv, x0 - eps), x0 + eps).clamp(0.0, 1.0)
        return adv


def normaliser(preprocessing: Preprocessing) -> Normalise:
    """Maps images in [0, 1] (8-bit pixels / 255) to the model's input, as the extraction
    decoder does: `(x * 255 * scale - mean) / std` per channel."""
    mean = torch.tensor(preprocessing.mean).reshape(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std).reshape(1, -1, 1, 1)
    factor = 255.0 * preprocessing.scale

    def normalise(x: Tensor) -> Tensor:
        return (x * factor - mean.to(x)) / std.to(x)

    return normalise


def _loss_gradient(model: nn.Module, x: Tensor, y: Tensor, normalise: Normalise | None) -> Tensor:
    """d(summed cross-entropy)/dx: summed, so the step does not depend on the batch size."""
    x = x.detach().requires_grad_(True)
    # A clone, in case y was made under inference mode: those cannot be saved for backward.
    y = y.detach().clone()
    logits = model(normalise(x) if normalise is not None else x)
    loss = F.cross_entropy(logits, y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad.detach()


@contextmanager
def _attacking(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the attack, the model's own state afterwards;
    autograd on even inside the caller's `torch.inference_mode()` or `no_grad()`."""
    training = [(module, module.training) for module in model.modules()]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in frozen:
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for module, flag in training:
            module.training = flag
        for p, flag in frozen:
            p.requires_grad_(flag)


def _check(x: Tensor, y: Tensor, eps: float) -> None:
    if eps < 0:
        raise SpecError(f"eps is a pixel distance in [0, 1], got {eps}")
    if x.dim() < 2 or y.shape != (x.shape[0],):
        raise SpecError(f"give a batch x (n, ...) and one class per image y (n,), got {y.shape}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise SpecError(
            "images must be pixels in [0, 1]; pass the model's normalisation as normalise"
        )
