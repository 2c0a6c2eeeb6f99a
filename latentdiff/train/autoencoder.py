"""Training the first stage: generator and PatchGAN discriminator, alternating, with checkpoints and logs."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from latentdiff.autoencoder.losses import AutoencoderLoss, AutoencoderLossConfig
from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
from latentdiff.conditioning.conditioner import inpaint_boxes
from latentdiff.config import save_yaml, to_dict
from latentdiff.data import DataConfig, build_dataset
from latentdiff.data.transforms import save_image_grid
from latentdiff.device import autocast_context
from latentdiff.io.checkpoint import load_train_state, read_checkpoint, resolve_checkpoint, save_checkpoint
from latentdiff.io.errors import CheckpointError
from latentdiff.io.state import load_state_strict
from latentdiff.train.loop import (
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


@dataclass
class AutoencoderExperiment:
    """Everything ``latentdiff train`` needs for a first-stage run."""

    task: str = "autoencoder"
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Start from this native autoencoder checkpoint's weights (a new run, unlike --resume); "" starts from scratch.
    init_from: str = ""
    # "all", or "decoder": the encoder and quant_conv stay frozen, so the latent space (and every diffusion model
    # trained in it) is unchanged while the decoder improves, as Stable Diffusion's fine-tuned VAE decoders; or
    # "mask_decoder": only the mask-conditioned inpainting decoder (model.mask_decoder: true) trains, copied from
    # init_from's decoder, on random box masks (mask_full_prob of them cover everything, as SD inpainting's).
    train_only: str = "all"
    mask_full_prob: float = 0.1
    mask_min_box: float = 0.25  # box sides, as fractions of the image side
    mask_max_box: float = 0.75

    def __post_init__(self) -> None:
        if self.train_only not in TRAIN_ONLY:
            raise ValueError(f"train_only must be one of {', '.join(TRAIN_ONLY)}, got {self.train_only!r}")
        if self.train_only != "all" and not self.init_from:
            raise ValueError(f"train_only: {self.train_only} fine-tunes a trained autoencoder: set init_from to its "
                             "checkpoint")
        if self.train_only == "mask_decoder" and not self.model.mask_decoder:
            raise ValueError("train_only: mask_decoder needs model.mask_decoder: true")
        if self.train_only == "all" and self.model.mask_decoder:
            raise ValueError("model.mask_decoder: true is trained after the autoencoder, from it: train_only: "
                             "mask_decoder with init_from its checkpoint")
        if not 0.0 < self.mask_min_box <= self.mask_max_box <= 1.0 or not 0.0 <= self.mask_full_prob <= 1.0:
            raise ValueError("mask_min_box / mask_max_box must satisfy 0 < min <= max <= 1, and mask_full_prob be "
                             "in [0, 1]")
        if self.data.channels != self.model.in_channels or self.data.channels != self.model.out_ch:
            raise ValueError(f"data.channels ({self.data.channels}) must equal model.in_channels "
                             f"({self.model.in_channels}) and model.out_ch ({self.model.out_ch})")
        f = self.model.downsample_factor
        if self.data.image_size % f:
            raise ValueError(f"data.image_size {self.data.image_size} is not divisible by the downsampling factor {f}")


TRAIN_ONLY = ("all", "decoder", "mask_decoder")
LOG_COLUMNS = ["loss", "rec", "pixel", "perceptual", "kl", "vq", "perplexity", "codebook_usage", "g_loss",
               "d_weight", "d_loss", "logits_real", "logits_fake", "lr", "skipped", "seconds", "cpu_seconds"]


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, DDP) else module


def init_from(model: torch.nn.Module, exp: AutoencoderExperiment) -> None:
    """Load ``exp.init_from``'s weights into ``model``; its architecture must be ``exp.model``."""
    weights, config = read_checkpoint(exp.init_from)
    if config.get("task", "autoencoder") != "autoencoder":
        raise CheckpointError(f"init_from {exp.init_from} is a {config.get('task')!r} checkpoint, not an autoencoder")
    ours = json.loads(json.dumps(to_dict(exp.model)))  # tuples as lists, as the stored config has them
    theirs = dict(config.get("model") or {})
    theirs.setdefault("mask_decoder", False)  # checkpoints from before the field existed
    # A plain autoencoder may start a mask-decoder run: its decoder is copied into the mask decoder.
    add_mask_decoder = exp.train_only == "mask_decoder" and not theirs.get("mask_decoder", False)
    if add_mask_decoder:
        theirs["mask_decoder"] = True
    if theirs != ours:
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise CheckpointError(f"init_from {exp.init_from} has another architecture (model.{', model.'.join(differ)} "
                              "differ); copy its model section into this config")
    if add_mask_decoder:
        weights = dict(weights)
        for k, v in model.mask_decoder.state_dict().items():
            plain = k[len("decoder."):] if k.startswith("decoder.") else None
            weights["mask_decoder." + k] = weights["decoder." + plain].clone() if plain is not None else v
    load_state_strict(model, weights, "autoencoder")
    logger.info("initialised from %s (step %s)%s", exp.init_from, config.get("step"),
                "; its decoder copied into the mask decoder" if add_mask_decoder else "")


def train_autoencoder(exp: AutoencoderExperiment, resume: str | Path | None = None) -> Path:
    """Train (or resume) the run described by ``exp``; returns the run directory."""
    cfg = exp.train
    env = setup_distributed(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + env.rank)
    run_dir = Path(cfg.out_dir)

    model = Autoencoder(exp.model)
    if exp.init_from and resume is None:
        init_from(model, exp)
    if exp.train_only == "decoder":
        model.encoder.requires_grad_(False)
        model.quant_conv.requires_grad_(False)
    elif exp.train_only == "mask_decoder":
        model.requires_grad_(False)
        model.mask_decoder.requires_grad_(True)
    last_layer = (model.mask_decoder.decoder.conv_out.weight if exp.train_only == "mask_decoder"
                  else model.last_layer)
    model = model.to(env.device)
    loss_fn = AutoencoderLoss(exp.loss, exp.model.out_ch).to(env.device)
    disc = loss_fn.discriminator
    opt_ae = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                              betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    opt_d = (torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=tuple(cfg.betas),
                              weight_decay=cfg.weight_decay) if disc is not None else None)

    start_step, cpu_offset = 0, 0.0
    if resume is not None:
        ckpt = resolve_checkpoint(resume).parent
        weights, _ = read_checkpoint(ckpt)
        load_state_strict(model, weights, "autoencoder")
        state = load_train_state(ckpt)
        opt_ae.load_state_dict(state["opt_ae"])
        if disc is not None and state.get("discriminator") is not None:
            disc.load_state_dict(state["discriminator"])
            opt_d.load_state_dict(state["opt_d"])
        start_step = int(state["step"])
        cpu_offset = float(state.get("cpu_seconds", 0.0))
        logger.info("resumed from %s at step %d", ckpt, start_step)

    train_set = build_dataset(exp.data, "train")
    test_set = build_dataset(exp.data, "test")
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(exp, run_dir / "config.yaml")
        logger.info("training %s autoencoder (f=%d, %.2fM params) on %s (%d images), device %s, world %d",
                    exp.model.regularizer, exp.model.downsample_factor,
                    sum(p.numel() for p in model.parameters()) / 1e6, exp.data.name, len(train_set), env.device,
                    env.world_size)
    log = MetricLog(run_dir, LOG_COLUMNS, resume_step=start_step if resume else None) if env.is_main else None
    fixed = torch.stack([test_set[i]["image"] for i in range(min(8, len(test_set)))]).to(env.device)
    fixed_masks = (draw_masks(exp, fixed.shape[0], fixed.shape[-1], torch.Generator().manual_seed(0)).to(env.device)
                   if exp.train_only == "mask_decoder" else None)

    ddp_model = DDP(model) if env.distributed else model
    ddp_disc = DDP(disc) if env.distributed and disc is not None else disc
    batches = make_loader(train_set, cfg, env, start_step)
    guard = NonFiniteGuard(cfg.max_nonfinite)
    if resume is not None:
        # Restored last: building datasets and loaders draws from the global generator too.
        set_rng_state(state["rng"], env.device)
    config_dict = to_dict(exp)

    def checkpoint(step: int) -> None:
        if not env.is_main:
            return
        state = {"step": step, "opt_ae": opt_ae.state_dict(), "rng": rng_state(env.device),
                 "discriminator": disc.state_dict() if disc is not None else None,
                 "opt_d": opt_d.state_dict() if opt_d is not None else None, "cpu_seconds": clock.total_cpu()}
        save_checkpoint(run_dir, step, model.state_dict(), config_dict, state, keep=cfg.keep_checkpoints)

    clock = RunClock(cpu_offset)
    step = start_step
    progress = tqdm(total=cfg.steps, initial=start_step, desc="train", disable=not env.is_main, dynamic_ncols=True)
    running = RunningMeans()
    model.train()
    loss_fn.train()
    while step < cfg.steps:
        x = next(batches)["image"].to(env.device, non_blocking=True)
        factor = lr_factor(step, cfg)
        for group in opt_ae.param_groups:
            group["lr"] = cfg.lr * factor
        if opt_d is not None:
            for group in opt_d.param_groups:
                group["lr"] = (cfg.disc_lr or cfg.lr) * factor
        # Generator (autoencoder) step; the discriminator is frozen so its weights get no gradient here.
        if disc is not None:
            disc.requires_grad_(False)
        masks = draw_masks(exp, x.shape[0], x.shape[-1]).to(env.device) if exp.train_only == "mask_decoder" else None
        with autocast_context(env.device, cfg.precision):
            out = ddp_model(x, mask=masks)
        recon = out.reconstruction.float()
        loss, logs = loss_fn.generator_loss(x, recon, out.reg_loss.float(), step, last_layer, exp.model.regularizer)
        logs.update(out.stats)
        opt_ae.zero_grad(set_to_none=True)
        ok = guard.check(loss, step)
        if ok:
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt_ae.step()
        # Discriminator step on the same batch, once the GAN has started.
        if ok and loss_fn.gan_active(step):
            disc.requires_grad_(True)
            d_loss, d_logs = loss_fn.discriminator_step_loss(x, recon.detach(), ddp_disc)
            opt_d.zero_grad(set_to_none=True)
            if guard.check(d_loss, step):
                d_loss.backward()
                opt_d.step()
            logs.update(d_logs)
        step += 1
        progress.update(1)
        if ok:
            running.add(logs)
        if env.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
            means = running.flush()
            means.update(lr=opt_ae.param_groups[0]["lr"], skipped=guard.total, seconds=round(clock.wall(), 1),
                         cpu_seconds=round(clock.total_cpu(), 1))
            log.write(step, means)
            progress.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}",
                                 rec=f"{means.get('pixel', float('nan')):.4f}")
        if env.is_main and (step % cfg.sample_every == 0 or step == cfg.steps):
            save_reconstruction_grid(model, fixed, run_dir / "samples" / f"step_{step:07d}.png", fixed_masks)
        out_of_time = time_is_up(cfg, clock, env)
        if step % cfg.ckpt_every == 0 or step == cfg.steps or out_of_time:
            checkpoint(step)
        if out_of_time:
            logger.info("time limit of %.1f min reached at step %d", cfg.time_limit_minutes, step)
            break
    progress.close()
    if env.is_main:
        save_reconstruction_grid(model, fixed, run_dir / "reconstructions.png", fixed_masks)
        logger.info("finished at step %d in %.1f min; checkpoint in %s", step, clock.wall() / 60,
                    run_dir / "checkpoints")
    return run_dir


def draw_masks(exp: AutoencoderExperiment, n: int, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random box masks (n, 1, size, size) for training the mask decoder (1 = unknown)."""
    uniform = torch.rand((n, 5), generator=generator)
    return inpaint_boxes(uniform, size, exp.mask_full_prob, exp.mask_min_box, exp.mask_max_box)


@torch.no_grad()
def save_reconstruction_grid(model: Autoencoder, images: torch.Tensor, path: Path,
                             masks: torch.Tensor | None = None) -> None:
    """Inputs in the top row, their reconstructions (posterior mode) below; with ``masks``, the mask decoder's,
    and the masked inputs it saw in a middle row."""
    was_training = model.training
    model.eval()
    recon = model(images, sample_posterior=False, mask=masks).reconstruction.clamp(-1, 1)
    model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [images, recon] if masks is None else [images, images * (1 - masks), recon]
    save_image_grid(torch.cat(rows).cpu(), path, nrow=images.shape[0])

