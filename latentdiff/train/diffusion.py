"""Training the diffusion model on a frozen first stage's latents (or on pixels): ``DiffusionTrainer``, the hooks
on the training skeleton (``train/trainer.py``), which owns devices, DDP, resume, logs, checkpoints and budgets.

The hooks: AdamW on the UNet (and a jointly trained text encoder), autocast, an EMA of each (the skeleton's
weight averages: sample grids and ``model.safetensors`` use them with ``use_ema``), the latent cache
(``train/latent_cache.py``), the scale factor from the first global batch, and DDP around the UNet only.

Randomness: every step draws the posterior samples, class dropout, timesteps and noise of the whole *global*
batch from a CPU generator seeded with (seed, step), and each rank keeps its own rows, the ones the batch
sampler gave it. A resumed run needs no generator state to continue exactly, and a sample gets the same noise
whatever the number of processes: 2 processes with batch B take the same step as 1 process with batch 2B.
Torch's global RNG (UNet dropout) is saved in the checkpoint as in the autoencoder trainer; dropout is the one
thing that does differ between process counts.

Conditioning (``model.conditioner``): batches bring captions, class maps, images and labels; the conditioner
turns them into the UNet's inputs inside ``LatentDiffusion.loss`` (so that a jointly trained text encoder learns),
with the per-input dropout drawn with the rest of the step's randomness. The latent cache then also holds what
``Conditioner.prepare`` makes of each item (see ``train/latent_cache.py``). The conditioner's trainable weights
are optimised with the UNet, averaged by their own EMA, gradient-averaged across DDP ranks, and saved under
``cond_stage_model.*``. A jointly trained text encoder's word vocabulary is built from the training captions when
the run starts (and saved in the config). Sample grids of conditional models use the first ``sample_images``
items of ``sample_split`` (their captions, maps, images) as fixed inputs; the captions are written beside them
(``samples/captions.txt``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from latentdiff.conditioning.text import build_vocabulary
from latentdiff.data import DataConfig, build_dataset
from latentdiff.data.scenes import FashionScenes, caption_for
from latentdiff.data.transforms import save_image_grid
from latentdiff.device import autocast_context
from latentdiff.diffusion.model import LatentDiffusion, LatentDiffusionConfig
from latentdiff.diffusion.samplers import SAMPLERS
from latentdiff.formats.lora import KOHYA_FILE, PEFT_FILE, lora_from_layers, write_lora
from latentdiff.formats.native import load_autoencoder
from latentdiff.io.atomic import write_text
from latentdiff.nn.lora import load_lora_state, lora_state_dict, merged_state_dict
from latentdiff.train.ema import EMA
from latentdiff.train.finetune import TEXT_ENCODER_MODES, LoRAConfig, add_lora, adopt_base, set_text_encoder_training
from latentdiff.train.latent_cache import load_or_build_latent_cache
from latentdiff.train.loop import DistEnv, TrainConfig
from latentdiff.train.new_words import add_new_words, base_section, restore_embedding
from latentdiff.train.trainer import ScheduledOptimizer, Trainer, WeightAverage

logger = logging.getLogger(__name__)


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
    # Fine-tuning (train/finetune.py): the base model (a native run/export, an SD single file or a diffusers folder;
    # "" trains from scratch), which text-encoder weights train ("", frozen, trained) and LoRA adapters.
    init_from: str = ""
    text_encoder: str = ""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # Words added to a fine-tuned model's own text vocabulary (train/new_words.py): [] none, [auto] those of the
    # captions seen >= new_words_min_count times, or a list; new rows start as new_words_init's ("": the mean).
    new_words: list[str] = field(default_factory=list)
    new_words_min_count: int = 2
    new_words_init: str = ""

    def __post_init__(self) -> None:
        if self.text_encoder not in TEXT_ENCODER_MODES:
            raise ValueError(f"text_encoder must be frozen or trained (or empty: as the model is built), got "
                             f"{self.text_encoder!r}")
        if self.lora.rank and not self.init_from:
            raise ValueError("lora adapts a trained model: set init_from to it")
        if self.new_words and not self.init_from:
            raise ValueError("new_words grows a fine-tuned model's vocabulary (set init_from); trained from scratch, "
                             "the text encoder's vocabulary is built from the captions anyway")
        if self.new_words_min_count < 1:
            raise ValueError(f"new_words_min_count must be >= 1, got {self.new_words_min_count}")
        if self.lora.rank and self.text_encoder == "trained":
            raise ValueError("a LoRA run keeps the base weights frozen: for the text encoder use lora.text_encoder: "
                             "true instead of text_encoder: trained")
        if not self.init_from:  # else the model is the base's, checked when the trainer has loaded it
            self.check_model()

    def check_model(self) -> None:
        """The model section against the data and the sampling settings."""
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
        if self.cache_latents:
            d.check_cacheable()
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
               "scale_factor", "skipped", "images_per_s", "seconds", "cpu_seconds"]


def step_generator(seed: int, step: int, *stream: int) -> torch.Generator:
    """The CPU generator of one training step, the same on every rank: a function of (seed, step) only; ``stream``
    numbers further independent generators of the same step (DreamBooth's class half)."""
    state = np.random.SeedSequence([seed, step, *stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


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
    batch = default_collate([dataset[i % len(dataset)] for i in range(n)])  # a small split's inputs repeat
    inputs = model.cond_stage_model.prepare(batch)
    if model.config.conditioner.image == "inpaint":
        boxes = model.cond_stage_model.draw(n, torch.Generator().manual_seed(exp.train.seed))["inpaint_box"]
        inputs["mask"] = model.cond_stage_model.training_masks(boxes)
    captions = [str(c) for c in batch.get("caption", [])] if model.config.conditioner.text_encoder != "none" else []
    return inputs, captions


@torch.no_grad()
def save_sample_grid(model: LatentDiffusion, exp: DiffusionExperiment, path: Path,
                     inputs: dict[str, torch.Tensor] | None = None) -> None:
    """``exp.sample_images`` samples from a fixed seed (one class per column for class models; conditioned on
    ``inputs``, see ``sample_inputs``, for conditioner models), as a PNG."""
    n = exp.sample_images
    labels = _class_labels(exp, n)
    cond = {"y": labels} if labels is not None else inputs
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


class DiffusionTrainer(Trainer):
    """The diffusion model on the skeleton (see the module docstring)."""

    log_columns = LOG_COLUMNS
    model_name = "latent diffusion model"
    adapts_base: ClassVar[bool] = False  # a run that adds to a frozen base (textual inversion) reloads it on resume
    exp: DiffusionExperiment
    model: LatentDiffusion

    def build(self, resuming: bool) -> None:
        exp, cfg, env = self.exp, self.cfg, self.env
        if env.is_main and tuple(cfg.betas) == (0.5, 0.9):
            logger.warning("train.betas is (0.5, 0.9), TrainConfig's GAN default; diffusion models usually train "
                           "with (0.9, 0.999)")
        # A fine-tuning run starts from its base; a LoRA run reloads it on resume too (its checkpoints hold the
        # adapters, not the base weights).
        base = adopt_base(base_section(exp.model, exp.new_words), exp.data, exp.init_from) if exp.init_from and (
            not resuming or exp.lora.rank or self.adapts_base) else None
        if base is not None:
            exp.model = base.config
        if exp.init_from:
            exp.check_model()
        mc = exp.model
        self.train_set: Dataset | None = None
        if mc.conditioner is not None:  # built first: the conditioner's checks (and vocabulary) read the data
            self.train_set = self.source_data()
            _check_inputs(exp, self.train_set)
            if mc.conditioner.text_encoder == "transformer" and not mc.conditioner.text.vocab:
                if resuming:
                    raise ValueError("the run's config has no text vocabulary; it cannot be resumed")
                _build_vocabulary(exp, self.train_set)
        if base is not None:
            model = base
        elif resuming:
            model = LatentDiffusion(mc)  # the first stage's weights come from the checkpoint (restore)
        else:
            if mc.first_stage_config is not None and not mc.first_stage:
                raise ValueError("model.first_stage_config is filled in from model.first_stage: give the path of "
                                 "the autoencoder checkpoint as model.first_stage")
            model = LatentDiffusion(mc, load_autoencoder(mc.first_stage, "cpu") if mc.first_stage else None)
        exp.model = model.config  # what building the model filled in (the first stage's config...) is saved
        set_text_encoder_training(model, exp.text_encoder)
        self.lora_unet, self.lora_text = add_lora(model, exp.lora) if exp.lora.rank else ({}, {})
        if exp.new_words:
            exp.new_words = add_new_words(model, exp.new_words, exp.new_words_min_count, exp.new_words_init,
                                          lambda: dataset_captions(self.train_set), base is None, cfg.weight_decay)
        self.model = model.to(env.device)
        self.cond_params = model.conditioner_parameters()
        if env.distributed and self.cond_params:
            # DDP makes the UNet's initial weights rank 0's; the conditioner is outside it (each rank seeded apart).
            for p in self.cond_params:
                dist.broadcast(p.data, src=0)
        self.ddp_net = self.distributed(model.model)  # before the optimiser and EMA: FSDP replaces the parameters
        self.optimizer = self.adam(model.trainable_parameters(), cfg.lr)
        self.optimizers = {"optimizer": ScheduledOptimizer(self.optimizer, cfg.lr)}
        self._add_averages()
        self.grid_inputs: dict[str, torch.Tensor] = {}

    def _add_averages(self) -> None:
        """EMAs of the UNet and a trained conditioner; none in a LoRA run (its checkpoints stay small: the raw
        weights an average needs beside it would be the whole UNet)."""
        exp, model = self.exp, self.model
        self.ema: EMA | None = None
        if exp.lora.rank:
            return
        self.ema = EMA(model.model, exp.ema_decay, exp.ema_warmup)
        self.averages = [WeightAverage("ema", self.ema, model.model, prefix="model.", raw_name="model")]
        if self.cond_params:
            cond_ema = EMA(model.cond_stage_model, exp.ema_decay, exp.ema_warmup)
            self.averages.append(WeightAverage("cond_ema", cond_ema, model.cond_stage_model,
                                               prefix="cond_stage_model.", raw_name="cond_stage_model"))
        self.use_averages = exp.use_ema

    def restore(self, weights: dict[str, torch.Tensor], config: dict[str, Any], state: dict[str, Any]) -> None:
        if self.exp.lora.rank:  # model.safetensors is the merged model; the adapters are in train_state.pt
            load_lora_state(self.model, state["lora"])
            if self.exp.new_words:  # trained rows of the token embedding, which is no adapter
                restore_embedding(self.model, weights)
        else:
            super().restore(weights, config, state)
        self.model.config.scale_factor = float(config["model"]["scale_factor"])

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        """A LoRA run's model.safetensors is the base with the adapters merged: every loader samples it as is."""
        return merged_state_dict(self.model) if self.exp.lora.rank else super().checkpoint_weights()

    def checkpoint_saved(self, folder: Path) -> None:
        """A LoRA run's adapters, beside its checkpoint, in the kohya and the diffusers/PEFT formats."""
        if self.exp.lora.rank:
            lora = lora_from_layers(self.lora_unet, self.lora_text)
            for file_format, name in (("kohya", KOHYA_FILE), ("peft", PEFT_FILE)):
                write_lora(lora, self.model.config.unet, folder / name, file_format)

    def source_data(self) -> Dataset:
        """The training items the data config names (DreamBooth reads its own folders)."""
        return build_dataset(self.exp.data, "train")

    def training_data(self) -> Dataset:
        if self.train_set is None:
            self.train_set = self.source_data()
        _check_labels(self.exp, self.train_set)
        return self.train_set

    def describe(self) -> str:
        model = self.model
        space = "pixel space" if model.pixel_space else f"latents {model.latent_shape} (f={model.downsample_factor})"
        cond_note = f" + conditioner {sum(p.numel() for p in self.cond_params) / 1e6:.2f}M" if self.cond_params else ""
        if self.exp.lora.rank:
            trained = sum(p.numel() for p in model.trainable_parameters())
            return (f"training LoRA adapters (rank {self.exp.lora.rank}, {self.exp.lora.targets}, "
                    f"{len(self.lora_unet)} UNet + {len(self.lora_text)} text-encoder layers, {trained / 1e6:.3f}M "
                    f"params) on {self.exp.init_from} ({space})")
        return (f"training a {model.config.conditioning} diffusion model ({space}, UNet "
                f"{sum(p.numel() for p in model.model.parameters()) / 1e6:.2f}M params{cond_note})")

    def prepare_data(self, dataset: Dataset) -> Dataset:
        exp = self.exp
        if not exp.cache_latents:
            return dataset
        if exp.data.random_flip:
            logger.warning("cache_latents with data.random_flip: each image is cached with one fixed flip")
        if exp.data.name.strip().lower() == "photos":
            logger.warning("cache_latents with random photo crops: one fixed crop per item is cached")
        return load_or_build_latent_cache(self.model, dataset, exp.data, self.run_dir, self.env, self.cfg.num_workers)

    def prepare_samples(self) -> None:
        self.grid_inputs, captions = sample_inputs(self.model, self.exp)
        if captions:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            write_text(self.run_dir / "samples" / "captions.txt", "\n".join(captions) + "\n")

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, Any] | None:
        loss, logs = self.batch_loss(batch, step_generator(self.cfg.seed, step))
        return logs if self.optimizer_step(loss, self.optimizer, step, average=self.cond_params) else None

    def batch_loss(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of ``batch`` (this rank's rows) and its logged terms, its randomness drawn from ``generator``."""
        model, env = self.model, self.env
        if self.exp.cache_latents:
            params = batch["params"].to(env.device, non_blocking=True)
        else:
            params = model.first_stage_parameters(batch["image"].to(env.device, non_blocking=True))
        n = params.shape[0]
        # The batch's own latent size: aspect-ratio buckets (data.buckets) change it from batch to batch.
        rows, mine = self.draw_rows(n)  # the whole step's (every rank's, every micro-batch's) draws; this one's
        draws = model.draw_training_noise(rows, generator,
                                          latent_shape=(model.latent_channels, *params.shape[2:]))
        draws = {k: v[mine] for k, v in draws.items()}
        latents = model.latents_from_parameters(params.float(), noise=draws.get("posterior"))
        if model.scale_factor == 0:
            _set_scale_factor(model, latents, env)
        z0 = latents * model.scale_factor
        cond = {"y": batch["label"].to(env.device)} if model.config.conditioning == "class" else None
        # The conditioner reads its inputs from the batch: raw (captions, images) or cached (token ids...).
        inputs = batch if model.cond_stage_model is not None else None
        with autocast_context(env.device, self.cfg.precision):
            return model.loss(z0, cond, network=self.ddp_net, draws=draws, inputs=inputs)

    def log_values(self) -> dict[str, Any]:
        return {"ema_decay": self.ema.current_decay() if self.ema is not None else None,
                "scale_factor": self.model.scale_factor}

    def train_state(self) -> dict[str, Any]:
        state = {"scale_factor": self.model.scale_factor}
        if self.exp.lora.rank:
            return {**state, "lora": lora_state_dict(self.model)}
        if self.model.cond_stage_model is not None and not self.cond_params:
            # A frozen conditioner is not averaged (its raw weights are the saved ones), yet train_state.pt has
            # always held its weights too.
            state["cond_stage_model"] = self.model.cond_stage_model.state_dict()
        return state

    def save_samples(self, path: Path) -> None:
        save_sample_grid(self.model, self.exp, path, self.grid_inputs)
