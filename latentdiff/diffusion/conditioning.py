"""The diffusion model's side of its conditioner: the UNet checked against what the conditioner gives, and a
caller's inputs turned into the UNet's conditioning dict (and the unconditional branch for guidance).

The ``Conditioner`` itself (``latentdiff.conditioning.conditioner``) knows nothing of the UNet; ``LatentDiffusion``
and its config call these functions.
"""

from __future__ import annotations

from typing import Any

import torch

from latentdiff.conditioning.conditioner import Conditioner, ConditionerConfig
from latentdiff.conditioning.embedders.base import Encode
from latentdiff.conditioning.embedders.registry import registered_input_keys
from latentdiff.diffusion.unet import UNetConfig

COND_KEYS = ("context", "context_mask", "y", "concat")  # what UNetModel.forward takes


def check_unet_fits(c: ConditionerConfig, mode: str, unet: UNetConfig, num_classes: int) -> None:
    """Check the conditioning ``mode`` and the UNet against what the conditioner gives; fill in the UNet's
    ``context_dim`` and ``num_classes`` (label embeddings, the null class included) where they are unset."""
    if num_classes:
        raise ValueError(f"model.num_classes is for conditioning 'class'; with {mode!r} labels are "
                         "model.conditioner.num_classes")
    want_context, want_concat = mode in ("crossattn", "hybrid"), mode in ("concat", "hybrid")
    if c.has_context != want_context or c.has_concat != want_concat:
        gives = " and ".join(k for k, v in (("cross-attention tokens", c.has_context),
                                            ("concat channels", c.has_concat)) if v) or "only labels"
        right = {(True, False): "crossattn", (False, True): "concat", (True, True): "hybrid"}.get(
            (c.has_context, c.has_concat), "none of these")
        raise ValueError(f"conditioning {mode!r} does not fit the conditioner, which gives {gives}: use "
                         f"conditioning: {right}")
    if c.has_context:
        if not unet.use_spatial_transformer:
            raise ValueError("cross-attention conditioning needs model.unet.use_spatial_transformer: true")
        if not unet.context_dim:
            unet.context_dim = c.context_dim
        elif unet.context_dim != c.context_dim:
            raise ValueError(f"model.unet.context_dim ({unet.context_dim}) must equal the conditioner's token "
                             f"width ({c.context_dim})")
    elif unet.context_dim:
        raise ValueError(f"model.unet.context_dim is {unet.context_dim} but the conditioner gives no "
                         "cross-attention tokens; set model.unet.context_dim to null")
    if c.num_classes:
        if not unet.num_classes:
            unet.num_classes = c.num_classes + 1  # the extra index is the null class
        elif unet.num_classes != c.num_classes + 1:
            raise ValueError(f"model.unet.num_classes must be conditioner.num_classes + 1 = {c.num_classes + 1} "
                             f"(the last embedding is the null class), got {unet.num_classes}")
    elif unet.num_classes:
        raise ValueError("model.unet.num_classes is set but the conditioner has no labels (num_classes: 0)")
    if not want_concat and unet.out_channels != unet.in_channels:
        raise ValueError(f"model.unet.out_channels ({unet.out_channels}) must equal in_channels "
                         f"({unet.in_channels}) without concat conditioning")


def broadcast(prepared: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Inputs given once (one caption, one class map) repeated for a batch of ``n``."""
    return {k: (v.expand(n, *v.shape[1:]) if len(v) == 1 and n > 1 else v) for k, v in prepared.items()}


def encode_conditioning(cs: Conditioner, inputs: dict[str, Any], n: int, encode: Encode,
                        drop: torch.Tensor | None = None,
                        draws: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The UNet's dict from raw or prepared inputs; ``draws`` fill in what a training batch leaves to chance."""
    prepared = cs.complete(broadcast(cs.prepare(inputs), n), draws or {})
    return cs(prepared, drop=drop, encode=encode, n=n)


def guidance_pair(cs: Conditioner, cond: dict[str, Any] | None, uncond: dict[str, Any] | None, n: int,
                  encode: Encode, need_uncond: bool = True
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(cond, uncond) UNet dicts from raw inputs (or ready UNet dicts); uncond is None when nothing is dropped.

    The unconditional branch keeps the embedders trained without dropout and replaces the others by their
    unconditional versions (the empty caption...); inputs given in ``uncond`` (a negative prompt as
    ``{"caption": ...}``) replace those instead.
    """
    known = registered_input_keys()
    cond = dict(cond or {})
    if cond and set(cond) <= set(COND_KEYS):
        ready = cond
    else:
        unknown = sorted(set(cond) - set(known))
        if unknown:
            raise ValueError(f"unknown conditioning inputs {unknown}; give some of {', '.join(known)} (or a "
                             f"ready UNet dict of {', '.join(COND_KEYS)})")
        ready = encode_conditioning(cs, cond, n, encode)
    if not need_uncond:
        return ready, None
    if uncond is not None and set(uncond) <= set(COND_KEYS) and uncond:
        return ready, dict(uncond)
    unknown = sorted(set(uncond or {}) - set(known))
    if unknown:
        raise ValueError(f"unknown unconditional inputs {unknown}; give some of {', '.join(known)} (e.g. a "
                         "negative prompt as uncond={'caption': ...}) or a ready UNet dict")
    override = cs.prepare(uncond or {})
    drop = cs.keep(cs.unconditional_mask(n), override)
    if not bool(drop.any()) and not override:
        return ready, None
    prepared = cs.complete({**broadcast(cs.prepare(cond), n), **broadcast(override, n)}, {})
    return ready, cs(prepared, drop=drop, encode=encode, n=n)


__all__ = ["COND_KEYS", "broadcast", "check_unet_fits", "encode_conditioning", "guidance_pair"]
