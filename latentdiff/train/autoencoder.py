"""Training the first stage: generator and PatchGAN discriminator, alternating, with checkpoints and logs."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from latentdiff.autoencoder.losses import AutoencoderLoss, AutoencoderLossConfig
from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
from latentdiff.conditioning.conditioner import inpaint_boxes
from latentdiff.config import to_dict
from latentdiff.data import DataConfig, build_dataset
from latentdiff.data.transforms import save_image_grid
from latentdiff.device import autocast_context
from latentdiff.io.checkpoint import read_checkpoint
from latentdiff.io.errors import CheckpointError
from latentdiff.io.state import load_state_strict
from latentdiff.train.loop import TrainConfig
from latentdiff.train.trainer import ScheduledOptimizer, Trainer

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
               "d_weight", "d_loss", "logits_real", "logits_fake", "lr", "skipped", "images_per_s", "seconds",
               "cpu_seconds"]


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


class AutoencoderTrainer(Trainer):
    """The first stage on the skeleton: a generator step (reconstruction, regulariser, adversarial term), then a
    discriminator step on the same batch once the GAN has started; two Adam optimisers on one schedule."""

    log_columns = LOG_COLUMNS
    progress_terms = {"loss": "loss", "rec": "pixel"}
    final_samples = "reconstructions.png"
    model_name = "autoencoder"
    exp: AutoencoderExperiment

    def build(self, resuming: bool) -> None:
        exp, cfg, device = self.exp, self.cfg, self.env.device
        model = Autoencoder(exp.model)
        if exp.init_from and not resuming:
            init_from(model, exp)
        if exp.train_only == "decoder":
            model.encoder.requires_grad_(False)
            model.quant_conv.requires_grad_(False)
        elif exp.train_only == "mask_decoder":
            model.requires_grad_(False)
            model.mask_decoder.requires_grad_(True)
        self.last_layer = (model.mask_decoder.decoder.conv_out.weight if exp.train_only == "mask_decoder"
                           else model.last_layer)
        self.model = model.to(device)
        self.loss_fn = AutoencoderLoss(exp.loss, exp.model.out_ch).to(device)
        self.disc = self.loss_fn.discriminator
        self.opt_ae = self.adam([p for p in model.parameters() if p.requires_grad], cfg.lr, decoupled=False)
        disc_lr = cfg.disc_lr or cfg.lr
        self.opt_d = self.adam(self.disc.parameters(), disc_lr, decoupled=False) if self.disc is not None else None
        self.optimizers = {"opt_ae": ScheduledOptimizer(self.opt_ae, cfg.lr),
                           "opt_d": ScheduledOptimizer(self.opt_d, disc_lr) if self.opt_d is not None else None}
        self.ddp_model = self.distributed(self.model)
        self.ddp_disc = self.distributed(self.disc) if self.disc is not None else None

    def restore(self, weights: dict[str, torch.Tensor], config: dict[str, Any], state: dict[str, Any]) -> None:
        super().restore(weights, config, state)
        if self.disc is not None and state.get("discriminator") is not None:
            self.disc.load_state_dict(state["discriminator"])

    def training_data(self) -> Dataset:
        train_set = build_dataset(self.exp.data, "train")
        self.test_set = build_dataset(self.exp.data, "test")
        return train_set

    def describe(self) -> str:
        return (f"training {self.exp.model.regularizer} autoencoder (f={self.exp.model.downsample_factor}, "
                f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params)")

    def prepare_samples(self) -> None:
        fixed = torch.stack([self.test_set[i]["image"] for i in range(min(8, len(self.test_set)))])
        self.fixed = fixed.to(self.env.device)
        self.fixed_masks = None
        if self.exp.train_only == "mask_decoder":
            masks = draw_masks(self.exp, fixed.shape[0], fixed.shape[-1], torch.Generator().manual_seed(0))
            self.fixed_masks = masks.to(self.env.device)

    def train_mode(self) -> None:
        self.model.train()
        self.loss_fn.train()

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, Any] | None:
        exp, device, loss_fn = self.exp, self.env.device, self.loss_fn
        x = batch["image"].to(device, non_blocking=True)
        # Generator (autoencoder) step; the discriminator is frozen so its weights get no gradient here.
        if self.disc is not None:
            self.disc.requires_grad_(False)
        masks = draw_masks(exp, x.shape[0], x.shape[-1]).to(device) if exp.train_only == "mask_decoder" else None
        with autocast_context(device, self.cfg.precision):
            out = self.ddp_model(x, mask=masks)
        recon = out.reconstruction.float()
        loss, logs = loss_fn.generator_loss(x, recon, out.reg_loss.float(), step, self.last_layer,
                                            exp.model.regularizer)
        logs.update(out.stats)
        if not self.optimizer_step(loss, self.opt_ae, step):
            return None
        # Discriminator step on the same batch, once the GAN has started; unclipped, as it has always trained.
        if loss_fn.gan_active(step):
            self.disc.requires_grad_(True)
            d_loss, d_logs = loss_fn.discriminator_step_loss(x, recon.detach(), self.ddp_disc)
            self.optimizer_step(d_loss, self.opt_d, step, clip_gradients=False)
            logs.update(d_logs)
        return logs

    def train_state(self) -> dict[str, Any]:
        return {"discriminator": self.disc.state_dict() if self.disc is not None else None}

    def save_samples(self, path: Path) -> None:
        save_reconstruction_grid(self.model, self.fixed, path, self.fixed_masks)


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

