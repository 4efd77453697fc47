"""Exponential moving average of a network's weights (training only).

``ema = d * ema + (1 - d) * weights`` after each optimiser step, with
``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (``warmup``, for a run from
random weights, so that the average does not drag them along for thousands of steps) or
``d = decay`` (a warm start, whose first weights are already good). Validation and export
use the average when a run has it; the checkpoint keeps it (``ModelEMA.state_dict``) for an
exact resume.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """Averaged copy of ``model``'s state (parameters and float buffers; other buffers copied).

    Args:
        model: the network being trained (its current weights start the average).
        decay: the long-run decay per update, in (0, 1).
        warmup: lower the decay over the first updates (see the module docstring).

    Examples:
        >>> net = nn.Linear(2, 1)
        >>> ema = ModelEMA(net, decay=0.99)
        >>> ema.update(net)
        >>> sorted(ema.average)
        ['bias', 'weight']
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.average: dict[str, torch.Tensor] = {
            name: value.detach().clone() for name, value in model.state_dict().items()
        }

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        decay = self.current_decay()
        for name, value in model.state_dict().items():
            average = self.average[name]
            if average.is_floating_point():
                average.mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                average.copy_(value)
        self.updates += 1

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (e.g. an evaluation copy)."""
        model.load_state_dict(self.average)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "warmup": self.warmup,
                "average": {name: value.detach().cpu() for name, value in self.average.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the decay is the run's configuration (a warm restart may change it), not state
        self.updates = int(state["updates"])
        self.warmup = bool(state["warmup"])
        for name, value in state["average"].items():
            self.average[name].copy_(value)
