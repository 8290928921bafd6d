"""Grad-CAM in the extraction pass: the forward that captures the activations also keeps
the chosen layers' outputs in the autograd graph, and one backward of the batch's summed
target logits gives every sample's map at once (samples do not mix in an eval-mode model).

    map = ReLU(sum_c mean_yx(d logit_target / d A_c) * A_c)   at the layer's resolution

as Captum's `LayerGradCam(..., relu_attributions=True)` computes it one call at a time.
Hooks, kept outputs and the graph are released on every exit path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from workers.extraction.hooks import resolve

__all__ = ["Kept", "grad_cam", "keeping", "targets"]


@dataclass
class Kept:
    """The outputs of the Grad-CAM layers, still in the graph: one per forward call (a
    model exported with a frozen batch runs a batch in several calls)."""

    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)


@contextmanager
def keeping(model: nn.Module, layers: Sequence[str]) -> Iterator[Kept]:
    """Autograd on (even inside `inference_mode`), the parameters frozen, and a forward
    hook keeping each layer's output: the first one in the pass starts the graph, so that
    it holds only the layers the backward runs through. Hooks,
    kept outputs (and with them the graph) and the parameters' flags are restored on
    every exit path."""
    kept = Kept({name: [] for name in layers})
    handles: list[RemovableHandle] = []
    frozen = [(p, p.requires_grad) for p in model.parameters()]

    def make_hook(name: str) -> Callable[[nn.Module, object, object], torch.Tensor | None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> torch.Tensor | None:
            if not isinstance(output, torch.Tensor):  # hooks.capture reports it
                return None
            # The first Grad-CAM layer of the pass starts the graph, so the layers before
            # it record nothing for the backward; a later one is downstream of it, in it.
            held = output if output.requires_grad else output.detach().requires_grad_(True)
            kept.outputs[name].append(held)
            return held.clone()  # the model goes on with a copy an in-place op may change

        return hook

    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for name, module in resolve(model, layers).items():
            handles.append(module.register_forward_hook(make_hook(name)))
        with torch.inference_mode(False), torch.enable_grad():
            yield kept
    finally:
        for handle in handles:
            handle.remove()
        kept.outputs.clear()
        for p, flag in frozen:
            p.requires_grad_(flag)


def targets(
    logits: torch.Tensor, mode: str, fixed: int | None, labels: torch.Tensor | None
) -> torch.Tensor:
    """The class each sample's map explains: its prediction, its label (-1: unknown, no
    map), or one fixed class."""
    if fixed is not None:
        return torch.full((logits.shape[0],), fixed, dtype=torch.long, device=logits.device)
    if mode == "label":
        if labels is None:
            raise ValueError("Grad-CAM on labels needs the batch's labels")
        found = labels.to(device=logits.device, dtype=torch.long)
        return torch.where(found < logits.shape[1], found, -1)  # not a class: no map
    return logits.detach().argmax(dim=1)


def grad_cam(logits: torch.Tensor, kept: Kept, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """One backward of the summed target logits to every kept output; each layer's maps
    (n, *spatial) in float32, NaN where the target is -1. The graph is freed by it."""
    n = logits.shape[0]
    names = list(kept.outputs)
    outputs = [t for name in names for t in kept.outputs[name]]
    known = target >= 0
    chosen = logits.gather(1, target.clamp(min=0)[:, None])[:, 0]
    total = torch.where(known, chosen, torch.zeros_like(chosen)).sum()
    grads = torch.autograd.grad(total, outputs, allow_unused=True)
    maps: dict[str, torch.Tensor] = {}
    at = 0
    for name in names:
        calls = len(kept.outputs[name])
        acts = torch.cat([t.detach() for t in kept.outputs[name]])[:n]
        parts = [
            g if g is not None else torch.zeros_like(t)  # a layer the target does not reach
            for g, t in zip(grads[at : at + calls], kept.outputs[name], strict=True)
        ]
        grad = torch.cat(parts)[:n]
        at += calls
        spatial = tuple(range(2, acts.dim()))
        weights = grad.float().mean(dim=spatial, keepdim=True)
        cam = torch.relu((weights * acts.float()).sum(dim=1))
        nan = torch.full_like(cam, float("nan"))
        maps[name] = torch.where(known.view(-1, *([1] * (cam.dim() - 1))), cam, nan)
    for held in kept.outputs.values():  # they hold the rest of the graph
        held.clear()
    return maps
