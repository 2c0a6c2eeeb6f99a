"""Training the diffusion model on a frozen first stage's latents (or on pixels), with EMA, checkpoints and logs.

The structure follows ``train/autoencoder.py``: AdamW on the UNet only, warm-up and decay through ``lr_factor``,
gradient clipping, autocast, an EMA of the UNet's weights, atomic checkpoints with exact ``--resume``, sample
grids, a CSV/JSONL log, the non-finite-loss guard, and DDP under ``torchrun`` (the UNet only; rank 0 writes).

Randomness: every step draws the posterior samples, class dropout, timesteps and noise of the whole *global*
batch from a CPU generator seeded with (seed, step), and each rank keeps its own rows, the ones the batch
sampler gave it. A resumed run needs no generator state to continue exactly, and a sample gets the same noise
whatever the number of processes: 2 processes with batch B take the same step as 1 process with batch 2B.
Torch's global RNG (UNet dropout) is saved in the checkpoint as in the autoencoder trainer; dropout is the one
thing that does differ between process counts.

Latent cache: with a frozen first stage, encoding the same images every epoch is wasted work, so with
``cache_latents`` the training set is encoded once into ``<out_dir>/latent_cache.safetensors``: the KL
posterior's parameters (each step still samples z ~ q(z|x) with the step's generator), the quantised latents
of a VQ model, or the images themselves (as uint8, exactly) in pixel space, with the labels. The file carries a
key made of the first-stage checkpoint (resolved path, size, mtime) and the data config, and is reused on
resume or restart only when the key matches. Caching freezes the data: random flips are then applied once,
not per epoch.
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from latentdiff.config import save_yaml, to_dict
from latentdiff.data import DataConfig, build_dataset
from latentdiff.data.transforms import save_image_grid
from latentdiff.device import autocast_context
from latentdiff.diffusion.model import LatentDiffusion, LatentDiffusionConfig
from latentdiff.diffusion.samplers import SAMPLERS
from latentdiff.io.checkpoint import (
    CheckpointError,
    load_autoencoder,
    load_state_strict,
    load_train_state,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from latentdiff.train.ema import EMA
from latentdiff.train.loop import (
    DistEnv,
    MetricLog,
    NonFiniteGuard,
    RunClock,
    RunningMeans,
    TrainConfig,
    lr_factor,
    make_loader,
    rng_state,
    set_rng_state,
    setup_distributed,
    time_is_up,
)

logger = logging.getLogger(__name__)

CACHE_NAME = "latent_cache.safetensors"
CACHE_VERSION = 1


def _diffusion_train_defaults() -> TrainConfig:
    # TrainConfig's betas (0.5, 0.9) suit GANs; diffusion models train with Adam's usual (0.9, 0.999).
    return TrainConfig(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)


@dataclass
class DiffusionExperiment:
    """Everything ``latentdiff train`` needs for a diffusion run (``task: diffusion``).

    ``ema_decay``/``ema_warmup``: the EMA of the UNet's weights (warm-up as CompVis' LitEma). ``use_ema``: sample
    grids and the saved ``model.safetensors`` use the EMA weights (the raw ones are always in train_state.pt).
    ``cache_latents``: encode the training set once (see the module docstring). Every ``train.sample_every``
    steps a grid of ``sample_images`` samples (``sampler``, ``sample_steps`` steps, guidance
    ``sample_guidance`` for class models, one class per column) goes to ``samples/step_*.png``.
    """

    task: str = "diffusion"
    model: LatentDiffusionConfig = field(default_factory=LatentDiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=_diffusion_train_defaults)
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    use_ema: bool = True
    cache_latents: bool = True
    sample_images: int = 16
    sampler: str = "ddim"
    sample_steps: int = 50
    sample_guidance: float = 1.0

    def __post_init__(self) -> None:
        m, d = self.model, self.data
        if m.image_size == 0:
            m.image_size = d.image_size
        elif m.image_size != d.image_size:
            raise ValueError(f"model.image_size ({m.image_size}) differs from data.image_size ({d.image_size})")
        if m.channels == 0:
            m.channels = d.channels
        elif m.channels != d.channels:
            raise ValueError(f"model.channels ({m.channels}) differs from data.channels ({d.channels})")
        if m.pixel_space and m.unet.in_channels != d.channels:
            raise ValueError(f"a pixel-space model's model.unet.in_channels and out_channels ({m.unet.in_channels}) "
                             f"must equal data.channels ({d.channels})")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.sample_steps < 1 or self.sample_images < 1:
            raise ValueError("sample_steps and sample_images must be at least 1")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.sample_guidance != 1.0 and m.conditioning != "class":
            raise ValueError("sample_guidance needs a class-conditional model (model.conditioning: class)")


LOG_COLUMNS = ["loss", "loss_simple", "loss_simple_weighted", "loss_vlb", "grad_norm", "lr", "ema_decay",
               "scale_factor", "skipped", "seconds", "cpu_seconds"]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one training step, the same on every rank: a function of (seed, step) only."""
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# ---------------------------------------------------------------------------------------------------- latent cache


def latent_cache_key(exp: DiffusionExperiment) -> str:
    """Describes what a cache was made from: the first-stage file (path, size, mtime), its kind and the data."""
    first = exp.model.first_stage
    source: dict[str, Any] = {"first_stage": ""}
    if first:
        try:
            file = resolve_checkpoint(first).resolve()
            st = file.stat()
            source = {"first_stage": str(file), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        except CheckpointError:
            source = {"first_stage": str(first), "missing": True}
    fs = exp.model.first_stage_config
    kind = "pixel" if exp.model.pixel_space else (fs.regularizer if fs is not None else "unknown")
    return json.dumps({"version": CACHE_VERSION, "kind": kind, **source, "data": to_dict(exp.data)}, sort_keys=True)


class LatentCacheDataset(Dataset):
    """Items ``{"params": first-stage parameters, "label": int}`` from an in-memory cache."""

    def __init__(self, params: torch.Tensor, labels: torch.Tensor) -> None:
        self.params, self.labels = params, labels
        self.pixels_uint8 = params.dtype == torch.uint8

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self.params[index]
        if self.pixels_uint8:
            p = p.float().div_(127.5).sub_(1.0)  # the same ops as data.transforms.to_tensor: bit-identical
        return {"params": p, "label": int(self.labels[index])}


@torch.no_grad()
def encode_dataset(model: LatentDiffusion, dataset: Dataset, device: torch.device, batch_size: int = 256,
                   num_workers: int = 0, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """First-stage parameters (see ``LatentDiffusion.first_stage_parameters``) and labels of every item."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    params, labels = [], []
    for batch in tqdm(loader, desc="encode latents", disable=not progress, dynamic_ncols=True):
        x = batch["image"].to(device)
        p = model.first_stage_parameters(x).float().cpu()
        if model.pixel_space:
            p = ((p + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        params.append(p)
        labels.append(torch.as_tensor(batch["label"], dtype=torch.long))
    return torch.cat(params), torch.cat(labels)


def load_or_build_latent_cache(exp: DiffusionExperiment, model: LatentDiffusion, dataset: Dataset, run_dir: Path,
                               env: DistEnv) -> LatentCacheDataset:
    """Reuse ``run_dir/latent_cache.safetensors`` if its key matches, else encode ``dataset`` (rank 0) and write it."""
    path = run_dir / CACHE_NAME
    key = latent_cache_key(exp)

    def matching() -> bool:
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get("cache_key") == key
        except Exception:  # a damaged cache is rebuilt, whatever safetensors raises for it
            return False

    if env.is_main:
        if matching():
            logger.info("reusing the latent cache %s", path)
        else:
            if path.exists():
                logger.info("the latent cache %s was made from another first stage or data: re-encoding", path)
            params, labels = encode_dataset(model, dataset, env.device, num_workers=exp.train.num_workers)
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file({"params": params.contiguous(), "labels": labels}, str(tmp), metadata={"cache_key": key})
            os.replace(tmp, path)
            logger.info("wrote the latent cache %s (%d items, %s per item)", path, len(params), tuple(params.shape[1:]))
    if env.distributed:
        dist.barrier()
    tensors = load_file(str(path))
    return LatentCacheDataset(tensors["params"], tensors["labels"])


# ---------------------------------------------------------------------------------------------------- training


def _set_scale_factor(model: LatentDiffusion, latents: torch.Tensor, env: DistEnv) -> None:
    """1 / std of the first global batch's latents (gathered from every rank), the same on every rank."""
    if env.distributed:
        gathered = [torch.empty_like(latents) for _ in range(env.world_size)]
        dist.all_gather(gathered, latents.contiguous())
        latents = torch.cat(gathered)
    model.set_scale_factor_from(latents)


def _class_labels(exp: DiffusionExperiment, n: int) -> torch.Tensor | None:
    if exp.model.conditioning != "class":
        return None
    return torch.arange(n) % exp.model.num_classes


@torch.no_grad()
def save_sample_grid(model: LatentDiffusion, exp: DiffusionExperiment, path: Path, ema: EMA | None = None) -> None:
    """``exp.sample_images`` samples from a fixed seed (one class per column for class models), as a PNG."""
    n = exp.sample_images
    labels = _class_labels(exp, n)
    cond = {"y": labels} if labels is not None else None
    context = ema.average_parameters(model.model) if ema is not None else nullcontext()
    with context:
        images = model.sample(n, exp.sampler, exp.sample_steps, torch.Generator().manual_seed(exp.train.seed),
                              cond=cond, guidance_scale=exp.sample_guidance)
    nrow = min(n, exp.model.num_classes) if labels is not None else math.ceil(math.sqrt(n))
    save_image_grid(images.cpu(), path, nrow=nrow)


def _check_labels(exp: DiffusionExperiment, dataset: Dataset) -> None:
    if exp.model.conditioning != "class":
        return
    known = getattr(dataset, "num_classes", None)
    if known is None:
        raise ValueError(f"conditioning 'class' needs labelled data, but {exp.data.name!r} has no class labels")
    if known > exp.model.num_classes:
        raise ValueError(f"{exp.data.name!r} has {known} classes but model.num_classes is {exp.model.num_classes}")


def train_diffusion(exp: DiffusionExperiment, resume: str | Path | None = None) -> Path:
    """Train (or resume) the diffusion run described by ``exp``; returns the run directory."""
    cfg = exp.train
    env = setup_distributed(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + env.rank)
    run_dir = Path(cfg.out_dir)
    mc = exp.model
    if env.is_main and tuple(cfg.betas) == (0.5, 0.9):
        logger.warning("train.betas is (0.5, 0.9), TrainConfig's GAN default; diffusion models usually train "
                       "with (0.9, 0.999)")

    ckpt_dir, state = None, None
    if resume is not None:
        ckpt_dir = resolve_checkpoint(resume).parent
        state = load_train_state(ckpt_dir)
        model = LatentDiffusion(mc)  # the first stage's weights come from the checkpoint below
        weights, ckpt_config = read_checkpoint(ckpt_dir)
        load_state_strict(model, weights, "latent diffusion model")
        load_state_strict(model.model, state["model"], "UNet (raw weights)")
        mc.scale_factor = float(ckpt_config["model"]["scale_factor"])
    else:
        if mc.first_stage_config is not None and not mc.first_stage:
            raise ValueError("model.first_stage_config is filled in from model.first_stage: give the path of the "
                             "autoencoder checkpoint as model.first_stage")
        first_stage = load_autoencoder(mc.first_stage, "cpu") if mc.first_stage else None
        model = LatentDiffusion(mc, first_stage)
    model.to(env.device)

    opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                            weight_decay=cfg.weight_decay)
    ema = EMA(model.model, exp.ema_decay, exp.ema_warmup)
    start_step, cpu_offset = 0, 0.0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        start_step = int(state["step"])
        cpu_offset = float(state.get("cpu_seconds", 0.0))
        logger.info("resumed from %s at step %d", ckpt_dir, start_step)

    train_set = build_dataset(exp.data, "train")
    _check_labels(exp, train_set)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(exp, run_dir / "config.yaml")
        space = "pixel space" if model.pixel_space else f"latents {model.latent_shape} (f={model.downsample_factor})"
        logger.info("training a %s diffusion model on %s, UNet %.2fM params, on %s (%d images), device %s, world %d",
                    mc.conditioning, space, sum(p.numel() for p in model.trainable_parameters()) / 1e6,
                    exp.data.name, len(train_set), env.device, env.world_size)
    cached = exp.cache_latents
    if cached:
        if exp.data.random_flip:
            logger.warning("cache_latents with data.random_flip: each image is cached with one fixed flip")
        if exp.data.name.strip().lower() == "photos":
            logger.warning("cache_latents with random photo crops: one fixed crop per item is cached")
        train_data: Dataset = load_or_build_latent_cache(exp, model, train_set, run_dir, env)
    else:
        train_data = train_set
    log = MetricLog(run_dir, LOG_COLUMNS, resume_step=start_step if resume else None) if env.is_main else None

    ddp_net = DDP(model.model) if env.distributed else model.model
    batches = make_loader(train_data, cfg, env, start_step)
    guard = NonFiniteGuard(cfg.max_nonfinite)
    if state is not None:
        # Restored last: building datasets and loaders draws from the global generator too.
        set_rng_state(state["rng"], env.device)

    def checkpoint(step: int) -> None:
        if not env.is_main:
            return
        weights = model.state_dict()
        if exp.use_ema:
            weights.update({f"model.{name}": value for name, value in ema.shadow.items()})
        train_state = {"step": step, "model": model.model.state_dict(), "ema": ema.state_dict(),
                       "optimizer": opt.state_dict(), "rng": rng_state(env.device), "scale_factor": model.scale_factor,
                       "cpu_seconds": clock.total_cpu()}
        save_checkpoint(run_dir, step, weights, to_dict(exp), train_state, keep=cfg.keep_checkpoints)

    clock = RunClock(cpu_offset)
    step = start_step
    progress = tqdm(total=cfg.steps, initial=start_step, desc="train", disable=not env.is_main, dynamic_ncols=True)
    running = RunningMeans()
    grad_norm = None
    model.train()
    while step < cfg.steps:
        batch = next(batches)
        if cached:
            params = batch["params"].to(env.device, non_blocking=True)
        else:
            params = model.first_stage_parameters(batch["image"].to(env.device, non_blocking=True))
        n = params.shape[0]
        draws = model.draw_training_noise(n * env.world_size, step_generator(cfg.seed, step))
        draws = {k: v[env.rank::env.world_size] for k, v in draws.items()}
        latents = model.latents_from_parameters(params.float(), noise=draws.get("posterior"))
        if model.scale_factor == 0:
            _set_scale_factor(model, latents, env)
        z0 = latents * model.scale_factor
        cond = {"y": batch["label"].to(env.device)} if mc.conditioning == "class" else None
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        with autocast_context(env.device, cfg.precision):
            loss, logs = model.loss(z0, cond, network=ddp_net, draws=draws)
        opt.zero_grad(set_to_none=True)
        ok = guard.check(loss, step)
        if ok:
            loss.backward()
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.grad_clip))
            opt.step()
            ema.update(model.model)
        step += 1
        progress.update(1)
        if ok:
            running.add(logs)
        if env.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
            means = running.flush()
            means.update(grad_norm=grad_norm, lr=opt.param_groups[0]["lr"], ema_decay=ema.current_decay(),
                         scale_factor=model.scale_factor, skipped=guard.total, seconds=round(clock.wall(), 1),
                         cpu_seconds=round(clock.total_cpu(), 1))
            log.write(step, means)
            progress.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}")
        if env.is_main and (step % cfg.sample_every == 0 or step == cfg.steps):
            save_sample_grid(model, exp, run_dir / "samples" / f"step_{step:07d}.png", ema if exp.use_ema else None)
        out_of_time = time_is_up(cfg, clock, env)
        if step % cfg.ckpt_every == 0 or step == cfg.steps or out_of_time:
            checkpoint(step)
        if out_of_time:
            logger.info("time limit of %.1f min reached at step %d", cfg.time_limit_minutes, step)
            break
    progress.close()
    if env.is_main:
        save_sample_grid(model, exp, run_dir / "samples.png", ema if exp.use_ema else None)
        logger.info("finished at step %d in %.1f min; checkpoint in %s", step, clock.wall() / 60,
                    run_dir / "checkpoints")
    return run_dir
