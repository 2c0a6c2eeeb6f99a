"""Reconstruction quality of a first-stage model: PSNR, SSIM, perceptual distance, Frechet distance, codes."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from latentdiff.autoencoder.perceptual import build_perceptual_loss
from latentdiff.config import from_dict
from latentdiff.data import DataConfig, build_dataset
from latentdiff.device import select_device
from latentdiff.eval.metrics import EfficientNetFrechetDistance, FeatureStatistics, psnr, ssim
from latentdiff.formats.native import load_autoencoder
from latentdiff.io.checkpoint import read_checkpoint

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_autoencoder(checkpoint: str | Path, data: str | None = None, split: str = "test", limit: int = 2000,
                         batch_size: int = 64, image_size: int | None = None, perceptual: str = "efficientnet",
                         device: str = "auto", seed: int = 0, frechet: bool = True) -> dict[str, Any]:
    """Reconstruct ``limit`` images of ``data`` (default: the model's training data) with the posterior mode.

    Returns means (and standard errors) of PSNR and SSIM in the [-1, 1] range convention (data_range 2),
    the mean perceptual distance, the Frechet distance between EfficientNet-Lite0 features of inputs and
    reconstructions, and for VQ models codebook usage and perplexity over all evaluated codes.
    """
    dev = select_device(device)
    model = load_autoencoder(checkpoint, dev)
    _, config = read_checkpoint(checkpoint)
    data_cfg = from_dict(DataConfig, config.get("data", {}), "data")
    changes: dict[str, Any] = {"limit": limit, "random_flip": False, "seed": seed}
    if data is not None:
        changes["name"] = data
    if image_size is not None:
        changes["image_size"] = image_size
    data_cfg = dataclasses.replace(data_cfg, **changes)
    dataset = build_dataset(data_cfg, split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)

    perceptual_fn = None
    if perceptual != "none":
        perceptual_fn = build_perceptual_loss(perceptual).to(dev)
    fd = EfficientNetFrechetDistance(device=dev) if frechet else None
    real_stats, fake_stats = FeatureStatistics(), FeatureStatistics()
    psnrs, ssims, dists = [], [], []
    code_counts = None
    t0 = time.time()
    for batch in tqdm(loader, desc="eval", dynamic_ncols=True):
        x = batch["image"].to(dev)
        out = model(x, sample_posterior=False)
        recon = out.reconstruction.clamp(-1, 1)
        psnrs.append(psnr(x, recon).cpu())
        ssims.append(ssim(x, recon).cpu())
        if perceptual_fn is not None:
            dists.append(perceptual_fn(x, recon).cpu())
        if fd is not None:
            real_stats.update(fd.features(x))
            fake_stats.update(fd.features(recon))
        if out.indices is not None:
            counts = torch.bincount(out.indices.flatten().cpu(), minlength=model.config.n_embed)
            code_counts = counts if code_counts is None else code_counts + counts

    def summary(values: list[torch.Tensor]) -> tuple[float, float]:
        v = torch.cat(values).double()
        v = v[torch.isfinite(v)]
        return float(v.mean()), float(v.std() / math.sqrt(max(len(v), 1)))

    results: dict[str, Any] = {
        "checkpoint": str(checkpoint), "data": data_cfg.name, "split": split, "images": len(dataset),
        "image_size": data_cfg.image_size, "regularizer": model.config.regularizer,
        "downsample_factor": model.downsample_factor,
    }
    results["psnr"], results["psnr_stderr"] = summary(psnrs)
    results["ssim"], results["ssim_stderr"] = summary(ssims)
    if dists:
        results[f"perceptual_{perceptual}"], _ = summary(dists)
    if fd is not None and len(dataset) > 1:
        results["frechet_distance_efficientnet_lite0"] = EfficientNetFrechetDistance.compute(real_stats, fake_stats)
    if code_counts is not None:
        p = code_counts.double() / code_counts.sum()
        results["codebook_usage"] = float((code_counts > 0).double().mean())
        results["codebook_perplexity"] = float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
    results["seconds"] = round(time.time() - t0, 1)
    return results
