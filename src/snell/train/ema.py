"""An exponential moving average of the trained weights, scored beside the model.

The SNELLA authors' FGVC scripts (train_alloc_ema.py ``--model-ema --model-ema-decay 0.9999``) keep one, as timm's
ModelEma does: after every optimizer step θ_ema ← d·θ_ema + (1 − d)·θ, every evaluation scores both, and the better
of the two is reported. Theirs copies the whole model; frozen weights never move, so this one averages the trainable
tensors alone (LoRA's or SNELL's factors and the head: the size of the optimizer's state, not of the backbone), in
float32 whatever the parameters' dtype (a decay of 0.9999 moves a bf16 average by less than its last bit). Buffers
follow the model, as timm's ModelEma copies them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def trained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters an optimizer steps, by name (each tensor once, under its first name: named_parameters drops
    the later names of a shared one)."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


class WeightEma:
    """The moving average of ``model``'s trained parameters, starting from their values now."""

    def __init__(self, model: nn.Module, decay: float):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.average = {name: p.detach().float().clone() for name, p in trained_parameters(model).items()}

    def _parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = trained_parameters(model)
        if params.keys() != self.average.keys():
            raise ValueError(f"the model's {len(params)} trained parameters are not the {len(self.average)} averaged")
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average, after an optimizer step."""
        for name, param in self._parameters(model).items():
            self.average[name].lerp_(param.detach().float(), 1.0 - self.decay)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model with the averaged weights inside the block, its own ones again after it (even on error)."""
        params = self._parameters(model)
        own = {name: p.detach().clone() for name, p in params.items()}
        try:
            self.copy_to(model)
            yield
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(own[name])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Give the model the averaged weights (cast to each parameter's dtype)."""
        for name, param in self._parameters(model).items():
            param.copy_(self.average[name])

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "average": {name: t.cpu() for name, t in self.average.items()}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore a checkpoint's average (bit for bit); a different decay or set of tensors is an error."""
        average = state["average"]
        if state["decay"] != self.decay or average.keys() != self.average.keys():
            raise ValueError(
                f"the checkpoint's weight average (decay {state['decay']}, {len(average)} tensors) does not match "
                f"this run's (decay {self.decay}, {len(self.average)} tensors)"
            )
        for name, tensor in average.items():
            self.average[name].copy_(tensor)
