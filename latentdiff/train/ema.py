"""An exponential moving average of a model's weights, for sampling and saving smoother weights than the raw ones.

After every optimiser step, ``update`` moves each tracked parameter's shadow towards it:

    shadow <- shadow - (1 - decay) * (shadow - param)

With ``warmup`` (CompVis ``LitEma``), the decay used at the n-th update (n = 1, 2, ...) is
min(decay, (1 + n) / (10 + n)), so the average forgets its random initialisation quickly at the start of a
run (0.18 at the first update, 0.9 at the 80th, 0.99 at the 890th) instead of being dominated by it for
1 / (1 - decay) steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class EMA:
    """Shadow copies (float32) of the trainable parameters of one module, keyed by parameter name."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        # Frozen parameters (requires_grad False) never change, so averaging them would only cost memory.
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
        self._stored: dict[str, torch.Tensor] | None = None

    def current_decay(self) -> float:
        """The decay the next ``update`` will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = sorted(set(self.shadow) - set(params))
        if missing:
            raise KeyError(f"the model lacks parameters the EMA tracks: {', '.join(missing[:5])}")
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every shadow towards the model's current parameter."""
        decay = self.current_decay()
        self.num_updates += 1
        params = self._params(model)
        for name, shadow in self.shadow.items():
            shadow.sub_((1.0 - decay) * (shadow - params[name].detach().to(shadow.device, shadow.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's tracked parameters with the averages."""
        params = self._params(model)
        for name, shadow in self.shadow.items():
            params[name].copy_(shadow)

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Keep a copy of the model's current tracked parameters, to be put back by ``restore``."""
        params = self._params(model)
        self._stored = {name: params[name].detach().clone() for name in self.shadow}

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put back the parameters saved by ``store``."""
        if self._stored is None:
            raise RuntimeError("EMA.restore called without a preceding store")
        params = self._params(model)
        for name, value in self._stored.items():
            params[name].copy_(value)
        self._stored = None

    @contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block the model holds the averaged weights; its own weights come back afterwards."""
        self.store(model)
        self.copy_to(model)
        try:
            yield model
        finally:
            self.restore(model)

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {k: v.detach().clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            raise KeyError(f"EMA state does not fit the model; differing parameters: "
                           f"{sorted(set(shadow) ^ set(self.shadow))[:5]}")
        for name, value in shadow.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state for {name} has shape {tuple(value.shape)}, the model "
                                 f"{tuple(self.shadow[name].shape)}")
            self.shadow[name] = value.to(self.shadow[name].device, torch.float32).clone()
        self.decay, self.warmup = float(state["decay"]), bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
