"""The variational bound of a diffusion model on held-out data, in bits per dimension (``latentdiff eval-nll``).

What is bounded depends on where the model lives:

- **Latent models**: -log p(z0) of the scaled latents z0 = scale_factor * E(x), per latent dimension, with the
  continuous Gaussian decoder term at t = 0. That is a bound on a *density* of continuous latents, not on the
  pixels' probability: it can be negative, it depends on the scale factor, and it is comparable only between
  models on the same first stage and scale. ``bpd_unscaled_latents`` undoes the scale factor
  (bpd - log2(scale_factor)), the bound for E(x) itself.
- **Pixel-space models**: -log p(x) of 8-bit images mapped to [-1, 1], with DDPM's discretized Gaussian decoder
  (Ho et al. 2020, sec. 3.3) and the predicted x0 clipped to [-1, 1] as in DDPM's evaluation, which is
  comparable with published pixel bits/dim.

With ``timesteps="all"`` every one of the T terms is evaluated; with an integer K, K timesteps per image are
drawn uniformly and T times their mean is an unbiased estimate of the sum (``process.estimate_bpd``).
``bpd_stderr`` is the standard error of the mean over images, which includes the randomness of the noise and
of the timestep subset; ``timestep_stderr`` is the part due to the timestep subset alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from latentdiff.config import from_dict
from latentdiff.data import DataConfig, build_dataset
from latentdiff.device import select_device
from latentdiff.diffusion.process import estimate_bpd
from latentdiff.formats.native import load_latent_diffusion
from latentdiff.io.checkpoint import read_checkpoint

logger = logging.getLogger(__name__)


def parse_timesteps(value: str | int) -> str | int:
    """"all" or a positive integer K (the number of random timesteps per image)."""
    if isinstance(value, int) and not isinstance(value, bool):
        k = value
    elif str(value).strip().lower() == "all":
        return "all"
    else:
        try:
            k = int(str(value))
        except ValueError:
            raise ValueError(f"--timesteps must be 'all' or a positive integer, got {value!r}") from None
    if k < 1:
        raise ValueError(f"--timesteps must be 'all' or a positive integer, got {value!r}")
    return k


@torch.no_grad()
def evaluate_nll(checkpoint: str | Path, data: str | None = None, split: str = "test", limit: int = 256,
                 batch_size: int = 64, timesteps: str | int = "all", seed: int = 0, device: str = "auto",
                 ema: bool = True) -> dict[str, Any]:
    """The bound in bits/dim over ``limit`` images of ``data`` (default: the model's training data)."""
    timesteps = parse_timesteps(timesteps)
    dev = select_device(device)
    model = load_latent_diffusion(checkpoint, dev, ema=ema)
    _, config = read_checkpoint(checkpoint)
    data_cfg = from_dict(DataConfig, config.get("data", {}), "data")
    changes: dict[str, Any] = {"limit": limit, "random_flip": False, "seed": seed}
    if data is not None:
        changes["name"] = data
    data_cfg = dataclasses.replace(data_cfg, **changes)
    if data_cfg.channels != model.config.channels or data_cfg.image_size != model.config.image_size:
        raise ValueError(f"the model was trained on {model.config.channels}-channel {model.config.image_size}px "
                         f"images, the data config gives {data_cfg.channels}-channel {data_cfg.image_size}px")
    dataset = build_dataset(data_cfg, split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    pixel = model.pixel_space
    class_model = model.config.conditioning == "class"
    generator = torch.Generator().manual_seed(seed)

    totals, vlbs, priors, t_errs = [], [], [], []
    labelled = True
    t0 = time.time()
    for batch in tqdm(loader, desc="eval-nll", dynamic_ncols=True):
        x = batch["image"].to(dev)
        z0 = model.latents_from_parameters(model.first_stage_parameters(x), generator) * model.scale_factor
        cond = None
        if class_model:
            y = torch.as_tensor(batch["label"], dtype=torch.long)
            if bool((y < 0).any()):
                labelled = False  # unlabelled data: the null class gives the unconditional bound
                y = torch.full_like(y, model.null_class)
            cond = model.prepare_cond({"y": y}, len(y))
            cond = {k: v.to(dev) for k, v in cond.items()}

        def model_fn(x_t: torch.Tensor, t: torch.Tensor, cond: dict | None = cond) -> torch.Tensor:
            return model(x_t, t, cond).float()

        out = estimate_bpd(model.schedule, model_fn, z0.float(), timesteps, generator,
                           model.config.loss.parameterization, "fixed_small", 1.0 if pixel else None,
                           "discretized" if pixel else "continuous")
        totals.append(out["total_bpd"].double().cpu())
        vlbs.append(out["vlb_bpd"].double().cpu())
        priors.append(out["prior_bpd"].double().cpu())
        t_errs.append(out["stderr"].double().cpu())

    total = torch.cat(totals)
    n = len(total)
    bpd = float(total.mean())
    results: dict[str, Any] = {
        "checkpoint": str(checkpoint), "data": data_cfg.name, "split": split, "images": n,
        "space": "pixels" if pixel else "latents",
        "bound_on": ("-log2 p(x) per pixel dimension, 8-bit images (discretized decoder)" if pixel else
                     "-log2 p(z0) per latent dimension of the scaled latents (a density; not comparable with pixel "
                     "bits/dim)"),
        "timesteps": timesteps, "num_timesteps": model.schedule.num_timesteps,
        "conditioning": ("class labels" if labelled else "null class") if class_model else "none",
        "bpd": bpd,
        "bpd_stderr": float(total.std() / math.sqrt(n)) if n > 1 else math.nan,
        "timestep_stderr": float(torch.cat(t_errs).pow(2).sum().sqrt() / n),
        "vlb_bpd": float(torch.cat(vlbs).mean()),
        "prior_bpd": float(torch.cat(priors).mean()),
        "scale_factor": model.scale_factor,
        "latent_shape": list(model.latent_shape),
    }
    if not pixel:
        results["bpd_unscaled_latents"] = bpd - math.log2(model.scale_factor)
    results["seconds"] = round(time.time() - t0, 1)
    return results
