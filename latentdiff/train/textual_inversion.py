"""Textual inversion (Gal et al. 2022, arXiv:2208.01618): teach a trained model a new word by learning only that
word's token embedding(s); every other weight stays frozen (``task: textual_inversion``).

The word (``textual_inversion.token``, e.g. ``<my-thing>``) is added to the CLIP tokenizer as ``vectors`` new
tokens (``word``, ``word_1``, ...: diffusers' names), whose rows are appended to the text encoder's token embedding,
initialised from ``init_word``'s embedding (its tokens' rows one to one when it has ``vectors`` tokens, else their
mean in every row). Only the token embedding trains, with its gradient masked to the new rows; after each update
the old rows are put back exactly (AdamW's weight decay would move them). The data are ``data.path``'s images with
their captions, or ``textual_inversion.prompt`` for an image without one, or any captioned dataset whose captions
use the word.

Each checkpoint's ``model.safetensors`` is the base model as it was (the base vocabulary), and beside it the learned
vectors: ``learned_embeds.safetensors`` (diffusers' ``{token: vectors}``, ``load_textual_inversion``) and
``<token>.safetensors`` (A1111's ``emb_params``); both load with ``latentdiff generate --embedding FILE``.
``train_state.pt`` holds them too, so ``--resume`` continues exactly.

The text encoder must be CLIP (Stable Diffusion models): the bundled scenes models' word-level text transformer
has no added-word tokenizer here.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentdiff.conditioning.embedders.clip_text import FrozenCLIPTextEncoder
from latentdiff.config import ConfigError
from latentdiff.formats.embeddings import DIFFUSERS_EMBEDDING_FILE, write_embedding
from latentdiff.train.diffusion import DiffusionExperiment, DiffusionTrainer, dataset_captions
from latentdiff.train.finetune import text_encoder_module
from latentdiff.train.instance_data import PromptedFolder, prompt_sample_inputs
from latentdiff.train.trainer import ScheduledOptimizer

logger = logging.getLogger(__name__)


@dataclass
class TextualInversionConfig:
    """The word to learn: ``token`` (one word without spaces), ``init_word`` (its starting embedding), ``vectors``
    (tokens the word stands for) and ``prompt`` (the caption of an uncaptioned image and of the sample grid;
    ``{token}`` is replaced by the word)."""

    token: str = ""
    init_word: str = ""
    vectors: int = 1
    prompt: str = "a photo of {token}"

    def check(self) -> None:
        if not self.token or any(c.isspace() for c in self.token):
            raise ValueError(f"textual_inversion.token must be one word without spaces, got {self.token!r}")
        if not self.init_word.strip():
            raise ValueError("textual_inversion.init_word must name a word the model knows (e.g. 'dog')")
        if self.vectors < 1:
            raise ValueError(f"textual_inversion.vectors must be at least 1, got {self.vectors}")

    @property
    def sample_prompt(self) -> str:
        return self.prompt.replace("{token}", self.token)


@dataclass
class TextualInversionExperiment(DiffusionExperiment):
    """A diffusion experiment whose only trainable weights are a new word's embedding (see the module docstring)."""

    task: str = "textual_inversion"
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    use_ema: bool = False

    def __post_init__(self) -> None:
        if not self.init_from:
            raise ValueError("textual inversion teaches a trained model a word: set init_from to it")
        if self.lora.rank or self.text_encoder:
            raise ValueError("textual inversion trains the new word's embedding only: leave lora and text_encoder "
                             "unset")
        self.textual_inversion.check()
        super().__post_init__()


def _clip_encoder(trainer: DiffusionTrainer) -> FrozenCLIPTextEncoder:
    encoder = text_encoder_module(trainer.model)
    if not isinstance(encoder, FrozenCLIPTextEncoder):
        kind = "none" if encoder is None else type(encoder).__name__
        raise ConfigError(f"textual inversion needs a CLIP text encoder (a Stable Diffusion model); "
                          f"{trainer.exp.init_from} has {kind}")
    return encoder


def initial_vectors(encoder: FrozenCLIPTextEncoder, init_word: str, vectors: int) -> torch.Tensor:
    """``vectors`` rows from ``init_word``'s token embeddings (see the module docstring)."""
    ids = encoder.tokenizer.text_to_ids(init_word)
    if not ids:
        raise ValueError(f"textual_inversion.init_word {init_word!r} gives no tokens")
    rows = encoder.text_model.embeddings.token_embedding.weight.detach()[ids].float()
    return rows if len(ids) == vectors else rows.mean(0, keepdim=True).expand(vectors, -1).clone()


class TextualInversionTrainer(DiffusionTrainer):
    """The hooks of a textual-inversion run on the diffusion trainer."""

    exp: TextualInversionExperiment
    adapts_base = True

    def build(self, resuming: bool) -> None:
        super().build(resuming)
        ti, model, cfg = self.exp.textual_inversion, self.model, self.cfg
        encoder = _clip_encoder(self)
        encoder.config = dataclasses.replace(encoder.config)  # the saved model config keeps the base vocabulary
        self.base_vocab = encoder.config.vocab_size
        if encoder.tokenizer.vocab_size != self.base_vocab:
            raise ValueError(f"the tokenizer has {encoder.tokenizer.vocab_size} tokens and the text encoder "
                             f"{self.base_vocab}; a new word's token would not line up")
        init = initial_vectors(encoder, ti.init_word, ti.vectors)
        model.requires_grad_(False)
        try:
            self.token_ids = encoder.tokenizer.add_word(ti.token, ti.vectors)
        except ValueError as e:
            raise ValueError(f"textual_inversion.token: {e}") from e
        encoder.add_token_embeddings(init)
        self.embedding = encoder.text_model.embeddings.token_embedding.weight
        self.embedding.requires_grad_(True)
        self.frozen_rows = self.embedding.detach()[:self.base_vocab].clone()
        new_rows = torch.zeros(self.embedding.shape[0], 1, dtype=self.embedding.dtype, device=self.embedding.device)
        new_rows[self.base_vocab:] = 1
        self.embedding.register_hook(lambda grad: grad * new_rows)
        self.embedding_key = next(name for name, p in model.named_parameters() if p is self.embedding)
        self.cond_params = [self.embedding]
        self.optimizer = self.adam(self.cond_params, cfg.lr)  # honours train.optimizer (adamw8bit)
        self.optimizers = {"optimizer": ScheduledOptimizer(self.optimizer, cfg.lr)}
        self.averages, self.ema, self.use_averages = [], None, False
        self.ddp_net = model.model  # nothing of the UNet trains: no DDP around it

    def source_data(self) -> torch.utils.data.Dataset:
        ti, data = self.exp.textual_inversion, self.exp.data
        if data.path:
            return PromptedFolder(data, data.path, ti.sample_prompt, "data.path")
        return super().source_data()

    def training_data(self) -> torch.utils.data.Dataset:
        dataset = super().training_data()
        token = self.exp.textual_inversion.token.lower()
        if not any(token in caption.lower() for caption in dataset_captions(dataset)):
            raise ValueError(f"no caption of {self.exp.data.name!r} uses the word {token!r}: textual inversion learns "
                             "it from captions that do (give data.path, whose uncaptioned images take "
                             "textual_inversion.prompt)")
        return dataset

    def describe(self) -> str:
        ti = self.exp.textual_inversion
        return (f"textual inversion of {ti.token!r} ({ti.vectors} vectors of {self.embedding.shape[1]}, from "
                f"{ti.init_word!r}) on {self.exp.init_from}")

    def prepare_samples(self) -> None:
        prompts = [self.exp.textual_inversion.sample_prompt] * self.exp.sample_images
        self.grid_inputs = prompt_sample_inputs(self.model, prompts, self.run_dir)

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, Any] | None:
        logs = super().train_step(batch, step)
        if self.cfg.weight_decay > 0:  # masked gradients leave the old rows alone; decoupled decay would not
            with torch.no_grad():
                self.embedding[:self.base_vocab].copy_(self.frozen_rows)
        return logs

    def learned_vectors(self) -> torch.Tensor:
        return self.embedding.detach()[self.base_vocab:].clone()

    def restore(self, weights: dict[str, torch.Tensor], config: dict[str, Any], state: dict[str, Any]) -> None:
        weights = dict(weights)
        base_rows = weights[self.embedding_key]
        weights[self.embedding_key] = torch.cat([base_rows, state["textual_inversion"].to(base_rows)])
        super().restore(weights, config, state)
        with torch.no_grad():
            self.frozen_rows.copy_(self.embedding[:self.base_vocab])

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        weights = super().checkpoint_weights()
        weights[self.embedding_key] = weights[self.embedding_key][:self.base_vocab]
        return weights

    def train_state(self) -> dict[str, Any]:
        return {**super().train_state(), "textual_inversion": self.learned_vectors()}

    def checkpoint_saved(self, folder: Path) -> None:
        token, vectors = self.exp.textual_inversion.token, self.learned_vectors()
        write_embedding(token, vectors, folder / DIFFUSERS_EMBEDDING_FILE, "diffusers")
        write_embedding(token, vectors, folder / f"{token}.safetensors", "a1111")


__all__ = ["TextualInversionConfig", "TextualInversionExperiment", "TextualInversionTrainer", "initial_vectors"]
