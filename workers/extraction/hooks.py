"""Capture the outputs of named modules in one forward pass, leaving the model as found."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from workers.errors import LayerError
from workers.jobs import close_matches

__all__ = ["Forward", "capture", "resolve"]

# One forward pass: the model's output and the captured layer outputs.
Forward = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def resolve(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """Map each requested dotted name to its module, once each, in request order."""
    modules = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    for name in layers:
        if name not in modules or name == "":
            known = [n for n in modules if n]
            raise LayerError(f"unknown layer {name!r}; {close_matches(name, known)}")
        found[name] = modules[name]
    return found


def _describe(value: object) -> str:
    if isinstance(value, tuple | list):
        inner = ", ".join(type(v).__name__ for v in value[:4])
        return f"a {type(value).__name__} of ({inner}{', ...' if len(value) > 4 else ''})"
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))[:4]}"
    return f"a {type(value).__name__}"


@contextmanager
def capture(model: nn.Module, layers: Sequence[str]) -> Iterator[Forward]:
    """Yield a function running one eval-mode forward that also returns the detached output
    of each named layer. Hooks are removed and the training flag restored on every exit
    path, including KeyboardInterrupt."""
    targets = resolve(model, layers)
    outputs: dict[str, torch.Tensor] = {}
    handles: list[RemovableHandle] = []
    # Every module's own flag: a submodule kept in eval inside a training model stays so.
    flags = [(m, m.training) for m in model.modules()]

    def make_hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if not isinstance(output, torch.Tensor):
                raise LayerError(
                    f"layer {name!r} returned {_describe(output)}, not a tensor; "
                    "pick the module inside it that produces the tensor you want"
                )
            # A module called twice in one forward (a shared block) would be ambiguous.
            if name in outputs:
                raise LayerError(
                    f"layer {name!r} ran more than once in one forward pass; "
                    "pick a layer that runs once"
                )
            outputs[name] = output.detach()

        return hook

    try:
        for name, module in targets.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        model.eval()

        def forward(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            outputs.clear()
            result = model(x)
            if not isinstance(result, torch.Tensor):
                raise LayerError(f"the model returned {_describe(result)}, not a logits tensor")
            missing = [name for name in targets if name not in outputs]
            if missing:
                raise LayerError(f"layer {missing[0]!r} did not run in the forward pass")
            captured = {name: outputs[name] for name in targets}
            outputs.clear()
            return result, captured

        yield forward
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
