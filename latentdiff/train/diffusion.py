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

Conditioning (``model.conditioner``): batches bring captions, class maps, images and labels; the conditioner
turns them into the UNet's inputs inside ``LatentDiffusion.loss`` (so that a jointly trained text encoder learns),
with the per-input dropout drawn with the rest of the step's randomness. The latent cache then also holds what
``Conditioner.prepare`` makes of each item: token ids (captions are tokenised once), class maps (uint8), low-res
images, and for inpainting the images themselves (uint8: an 8-bit copy, like the files real inpainting inputs come
from; the masks are drawn per step, so the masked image is encoded each step). A frozen text encoder (MiniLM) is
run each step on the cached ids rather than cached: its outputs would be ~100 KB per caption. The conditioner's
trainable weights are optimised with the UNet, averaged by their own EMA, gradient-averaged across DDP ranks, and
saved under ``cond_stage_model.*``. A jointly trained text encoder's word vocabulary is built from the training
captions when the run starts (and saved in the config). Sample grids of conditional models use the first
``sample_images`` items of ``sample_split`` (their captions, maps, images) as fixed inputs; the captions are
written beside them (``samples/captions.txt``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from latentdiff.conditioning.text import build_vocabulary
from latentdiff.config import save_yaml, to_dict
from latentdiff.data import DataConfig, build_dataset
from latentdiff.data.scenes import FashionScenes, caption_for
from latentdiff.data.transforms import save_image_grid
from latentdiff.device import autocast_context
from latentdiff.diffusion.model import LatentDiffusion, LatentDiffusionConfig
from latentdiff.diffusion.samplers import SAMPLERS
from latentdiff.formats.native import load_autoencoder
from latentdiff.io.checkpoint import load_train_state, read_checkpoint, resolve_checkpoint, save_checkpoint
from latentdiff.io.errors import CheckpointError
from latentdiff.io.state import load_state_strict
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
    ``sample_guidance`` for class models, one class per column) goes to ``samples/step_*.png``; models with a
    conditioner are conditioned on the first ``sample_images`` items of ``sample_split``.
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
    sample_split: str = "test"

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
        if self.sample_guidance != 1.0 and m.conditioning == "none":
            raise ValueError("sample_guidance needs a class-conditional model (model.conditioning: class)")
        if self.sample_guidance != 1.0 and m.conditioner is not None and not any(m.conditioner.dropout_rates):
            raise ValueError("sample_guidance needs an unconditional branch: give some conditioner input a dropout "
                             "rate (e.g. model.conditioner.text_dropout: 0.1)")


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
    key: dict[str, Any] = {"version": CACHE_VERSION, "kind": kind, **source, "data": to_dict(exp.data)}
    if exp.model.conditioner is not None:  # only then: the keys of existing caches stay what they were
        key["conditioner"] = exp.model.conditioner.cache_signature()
    return json.dumps(key, sort_keys=True)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(127.5).sub_(1.0)  # the same ops as data.transforms.to_tensor: bit-identical


class LatentCacheDataset(Dataset):
    """Items ``{"params": first-stage parameters, "label": int, **conditioning inputs}`` from an in-memory cache.

    ``extras`` are ``Conditioner.prepare``'s tensors per item (token ids, class maps, low-res images, images);
    uint8 images come back in [-1, 1] and uint8 class maps as int64.
    """

    def __init__(self, params: torch.Tensor, labels: torch.Tensor,
                 extras: dict[str, torch.Tensor] | None = None) -> None:
        self.params, self.labels = params, labels
        self.pixels_uint8 = params.dtype == torch.uint8
        self.extras = dict(extras or {})
        for name, values in self.extras.items():
            if len(values) != len(params):
                raise ValueError(f"latent cache: {name!r} has {len(values)} items, params {len(params)}")

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self.params[index]
        if self.pixels_uint8:
            p = _from_uint8(p)
        item: dict[str, Any] = {"params": p, "label": int(self.labels[index])}
        for name, values in self.extras.items():
            value = values[index]
            if value.dtype == torch.uint8:
                value = _from_uint8(value) if name in ("image", "lowres") else value.long()
            item[name] = value
        return item


def _cacheable_inputs(model: LatentDiffusion, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The conditioner's prepared inputs of a batch, in their compact cache form (labels are cached apart)."""
    if model.cond_stage_model is None:
        return {}
    prepared = model.cond_stage_model.prepare(batch)
    prepared.pop("label", None)
    if "image" in prepared:
        prepared["image"] = _to_uint8(prepared["image"])
    if "class_map" in prepared and model.config.conditioner.num_map_classes <= 256:
        prepared["class_map"] = prepared["class_map"].to(torch.uint8)
    return {k: v.cpu() for k, v in prepared.items()}


@torch.no_grad()
def encode_dataset(model: LatentDiffusion, dataset: Dataset, device: torch.device, batch_size: int = 256,
                   num_workers: int = 0,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """First-stage parameters (see ``LatentDiffusion.first_stage_parameters``), labels and the conditioner's
    cacheable inputs (``Conditioner.prepare``; empty without a conditioner) of every item."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    params, labels, extras = [], [], {}
    for batch in tqdm(loader, desc="encode latents", disable=not progress, dynamic_ncols=True):
        x = batch["image"].to(device)
        p = model.first_stage_parameters(x).float().cpu()
        if model.pixel_space:
            p = _to_uint8(p)
        params.append(p)
        labels.append(torch.as_tensor(batch["label"], dtype=torch.long))
        for name, value in _cacheable_inputs(model, batch).items():
            extras.setdefault(name, []).append(value)
    return torch.cat(params), torch.cat(labels), {name: torch.cat(values) for name, values in extras.items()}


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
            params, labels, extras = encode_dataset(model, dataset, env.device, num_workers=exp.train.num_workers)
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tensors = {"params": params.contiguous(), "labels": labels}
            tensors.update({f"cond.{name}": value.contiguous() for name, value in extras.items()})
            save_file(tensors, str(tmp), metadata={"cache_key": key})
            os.replace(tmp, path)
            logger.info("wrote the latent cache %s (%d items, %s per item)", path, len(params), tuple(params.shape[1:]))
    if env.distributed:
        dist.barrier()
    tensors = load_file(str(path))
    extras = {name[len("cond."):]: value for name, value in tensors.items() if name.startswith("cond.")}
    return LatentCacheDataset(tensors["params"], tensors["labels"], extras)


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


def sample_inputs(model: LatentDiffusion, exp: DiffusionExperiment) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The fixed conditioning inputs of the sample grids: the first ``sample_images`` items of ``sample_split``
    (their captions, class maps, low-res images, labels), prepared; for inpainting with masks drawn from a
    generator seeded with ``train.seed``. Also returns the captions (empty without text)."""
    if model.cond_stage_model is None:
        return {}, []
    n = exp.sample_images
    dataset = build_dataset(exp.data, exp.sample_split)
    if len(dataset) < n:
        raise ValueError(f"sample_images is {n} but the {exp.sample_split!r} split has only {len(dataset)} items")
    batch = default_collate([dataset[i] for i in range(n)])
    inputs = model.cond_stage_model.prepare(batch)
    if model.config.conditioner.image == "inpaint":
        boxes = model.cond_stage_model.draw(n, torch.Generator().manual_seed(exp.train.seed))["inpaint_box"]
        inputs["mask"] = model.cond_stage_model.training_masks(boxes)
    captions = [str(c) for c in batch.get("caption", [])] if model.config.conditioner.text_encoder != "none" else []
    return inputs, captions


@torch.no_grad()
def save_sample_grid(model: LatentDiffusion, exp: DiffusionExperiment, path: Path, ema: EMA | None = None,
                     cond_ema: EMA | None = None, inputs: dict[str, torch.Tensor] | None = None) -> None:
    """``exp.sample_images`` samples from a fixed seed (one class per column for class models; conditioned on
    ``inputs``, see ``sample_inputs``, for conditioner models), as a PNG."""
    n = exp.sample_images
    labels = _class_labels(exp, n)
    cond = {"y": labels} if labels is not None else inputs
    with ExitStack() as stack:
        if ema is not None:
            stack.enter_context(ema.average_parameters(model.model))
        if cond_ema is not None:
            stack.enter_context(cond_ema.average_parameters(model.cond_stage_model))
        images = model.sample(n, exp.sampler, exp.sample_steps, torch.Generator().manual_seed(exp.train.seed),
                              cond=cond, guidance_scale=exp.sample_guidance)
    nrow = min(n, exp.model.num_classes) if labels is not None else math.ceil(math.sqrt(n))
    save_image_grid(images.cpu(), path, nrow=nrow)


def dataset_captions(dataset: Dataset) -> list[str]:
    """Every caption of a captioned dataset, for building a text encoder's vocabulary.

    Asks the dataset for captions without rendering images where it can (a ``caption(index)`` method; the scenes'
    ``scene(index)`` layouts), else reads every item.
    """
    if callable(getattr(dataset, "caption", None)):
        return [dataset.caption(i) for i in range(len(dataset))]
    if isinstance(dataset, FashionScenes):
        return [caption_for(dataset.scene(i)[0]) for i in range(len(dataset))]
    captions = []
    for i in tqdm(range(len(dataset)), desc="read captions", dynamic_ncols=True):
        item = dataset[i]
        if "caption" not in item:
            raise ValueError(f"{type(dataset).__name__} items have no 'caption': a text encoder needs captioned data")
        captions.append(str(item["caption"]))
    return captions


def _build_vocabulary(exp: DiffusionExperiment, dataset: Dataset) -> None:
    """Fill the jointly trained text encoder's vocabulary from the training captions, once, into the config."""
    text = exp.model.conditioner.text
    text.vocab = build_vocabulary(dataset_captions(dataset), text.vocab_min_count, text.vocab_max_size)
    if not text.vocab:
        raise ValueError(f"the training captions of {exp.data.name!r} give an empty vocabulary")
    logger.info("text vocabulary: %d words from the training captions (%s ...)", len(text.vocab),
                ", ".join(text.vocab[:8]))


def _check_inputs(exp: DiffusionExperiment, dataset: Dataset) -> None:
    """A conditioner's inputs must be in the data: one clear error before any encoding."""
    c = exp.model.conditioner
    if c is None:
        return
    item = dataset[0]
    needed = {"caption": c.text_encoder != "none", "class_map": c.class_map != "none", "label": c.num_classes > 0}
    missing = [key for key, used in needed.items() if used and key not in item]
    if missing:
        raise ValueError(f"the conditioner needs {', '.join(missing)} in every item, but {exp.data.name!r} has "
                         f"only {', '.join(sorted(item))}")
    if c.num_classes > 0 and int(item["label"]) < 0:
        raise ValueError(f"conditioner.num_classes is set but {exp.data.name!r} has no class labels")


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

    train_set = None
    if mc.conditioner is not None:  # built first: the conditioner's checks (and vocabulary) read the data
        train_set = build_dataset(exp.data, "train")
        _check_inputs(exp, train_set)
        if mc.conditioner.text_encoder == "transformer" and not mc.conditioner.text.vocab:
            if resume is not None:
                raise ValueError("the run's config has no text vocabulary; it cannot be resumed")
            _build_vocabulary(exp, train_set)

    ckpt_dir, state = None, None
    if resume is not None:
        ckpt_dir = resolve_checkpoint(resume).parent
        state = load_train_state(ckpt_dir)
        model = LatentDiffusion(mc)  # the first stage's weights come from the checkpoint below
        weights, ckpt_config = read_checkpoint(ckpt_dir)
        load_state_strict(model, weights, "latent diffusion model")
        load_state_strict(model.model, state["model"], "UNet (raw weights)")
        if model.cond_stage_model is not None:
            load_state_strict(model.cond_stage_model, state["cond_stage_model"], "conditioner (raw weights)")
        model.config.scale_factor = float(ckpt_config["model"]["scale_factor"])
    else:
        if mc.first_stage_config is not None and not mc.first_stage:
            raise ValueError("model.first_stage_config is filled in from model.first_stage: give the path of the "
                             "autoencoder checkpoint as model.first_stage")
        first_stage = load_autoencoder(mc.first_stage, "cpu") if mc.first_stage else None
        model = LatentDiffusion(mc, first_stage)
    exp.model = mc = model.config  # what building the model filled in (the first stage's config...) is saved
    model.to(env.device)

    cond_params = model.conditioner_parameters()
    if env.distributed and cond_params:
        # DDP makes the UNet's initial weights rank 0's; the conditioner is outside it (each rank seeded apart).
        for p in cond_params:
            dist.broadcast(p.data, src=0)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                            weight_decay=cfg.weight_decay)
    ema = EMA(model.model, exp.ema_decay, exp.ema_warmup)
    cond_ema = EMA(model.cond_stage_model, exp.ema_decay, exp.ema_warmup) if cond_params else None
    start_step, cpu_offset = 0, 0.0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        if cond_ema is not None:
            cond_ema.load_state_dict(state["cond_ema"])
        start_step = int(state["step"])
        cpu_offset = float(state.get("cpu_seconds", 0.0))
        logger.info("resumed from %s at step %d", ckpt_dir, start_step)

    if train_set is None:
        train_set = build_dataset(exp.data, "train")
    _check_labels(exp, train_set)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(exp, run_dir / "config.yaml")
        space = "pixel space" if model.pixel_space else f"latents {model.latent_shape} (f={model.downsample_factor})"
        cond_note = f" + conditioner {sum(p.numel() for p in cond_params) / 1e6:.2f}M" if cond_params else ""
        logger.info("training a %s diffusion model on %s, UNet %.2fM params%s, on %s (%d images), device %s, "
                    "world %d", mc.conditioning, space, sum(p.numel() for p in model.model.parameters()) / 1e6,
                    cond_note, exp.data.name, len(train_set), env.device, env.world_size)
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
    grid_inputs: dict[str, torch.Tensor] = {}
    if env.is_main and model.cond_stage_model is not None:
        grid_inputs, grid_captions = sample_inputs(model, exp)
        if grid_captions:
            (run_dir / "samples").mkdir(parents=True, exist_ok=True)
            (run_dir / "samples" / "captions.txt").write_text("\n".join(grid_captions) + "\n")
    if state is not None:
        # Restored last: building datasets and loaders draws from the global generator too.
        set_rng_state(state["rng"], env.device)

    def checkpoint(step: int) -> None:
        if not env.is_main:
            return
        weights = model.state_dict()
        if exp.use_ema:
            weights.update({f"model.{name}": value for name, value in ema.shadow.items()})
            if cond_ema is not None:
                weights.update({f"cond_stage_model.{name}": value for name, value in cond_ema.shadow.items()})
        train_state = {"step": step, "model": model.model.state_dict(), "ema": ema.state_dict(),
                       "optimizer": opt.state_dict(), "rng": rng_state(env.device), "scale_factor": model.scale_factor,
                       "cpu_seconds": clock.total_cpu()}
        if model.cond_stage_model is not None:
            train_state["cond_stage_model"] = model.cond_stage_model.state_dict()
            if cond_ema is not None:
                train_state["cond_ema"] = cond_ema.state_dict()
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
        # The conditioner reads its inputs from the batch: raw (captions, images) or cached (token ids...).
        inputs = batch if model.cond_stage_model is not None else None
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        with autocast_context(env.device, cfg.precision):
            loss, logs = model.loss(z0, cond, network=ddp_net, draws=draws, inputs=inputs)
        opt.zero_grad(set_to_none=True)
        ok = guard.check(loss, step)
        if ok:
            loss.backward()
            if env.distributed and cond_params:
                _average_gradients(cond_params, env.world_size)
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.grad_clip))
            opt.step()
            ema.update(model.model)
            if cond_ema is not None:
                cond_ema.update(model.cond_stage_model)
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
            save_sample_grid(model, exp, run_dir / "samples" / f"step_{step:07d}.png", ema if exp.use_ema else None,
                             cond_ema if exp.use_ema else None, grid_inputs)
        out_of_time = time_is_up(cfg, clock, env)
        if step % cfg.ckpt_every == 0 or step == cfg.steps or out_of_time:
            checkpoint(step)
        if out_of_time:
            logger.info("time limit of %.1f min reached at step %d", cfg.time_limit_minutes, step)
            break
    progress.close()
    if env.is_main:
        save_sample_grid(model, exp, run_dir / "samples.png", ema if exp.use_ema else None,
                         cond_ema if exp.use_ema else None, grid_inputs)
        logger.info("finished at step %d in %.1f min; checkpoint in %s", step, clock.wall() / 60,
                    run_dir / "checkpoints")
    return run_dir


def _average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce the mean gradient of parameters outside the DDP wrapper (the conditioner's), in one call."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()
