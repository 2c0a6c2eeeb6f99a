"""New words for a fine-tuned model's own text encoder (``new_words``): a fine-tune keeps the base's vocabulary,
where a word its captions add would be ``[UNK]``; these words join it.

``new_words``: ``auto`` (every word of the training captions seen at least ``new_words_min_count`` times that the
vocabulary lacks, most frequent first, as ``build_vocabulary`` orders them) or a list of words; empty (the
default) keeps the base's vocabulary. The words are appended (old ids unchanged), each with a new row of the token
embedding initialised from ``new_words_init``'s row (a word of the vocabulary) or the mean of the word rows, so the
old prompts encode exactly as before training (``TextTransformer.add_words``). The run's config then holds the
grown vocabulary and, in ``new_words``, the words actually added, so that generate, export and every loader build
the grown encoder, and a resumed run adds the same words.

Which rows train: where the text encoder trains in full (a full fine-tune of the jointly trained encoder), the
whole embedding, new rows included. Where it does not (LoRA, ``text_encoder: frozen``) the embedding still trains,
its gradient masked to the new rows, so that the old rows stay the base's (``train.weight_decay`` must then be 0:
AdamW's decay would shrink them). A LoRA run's ``model.safetensors`` holds the embedding (it is not an adapter), and
its resume takes the trained rows back from there.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch

from latentdiff.conditioning.text import TextTransformer, build_vocabulary, split_caption
from latentdiff.config import ConfigError
from latentdiff.diffusion.model import LatentDiffusion, LatentDiffusionConfig
from latentdiff.train.finetune import text_encoder_module

logger = logging.getLogger(__name__)

AUTO = "auto"
EMBEDDING_KEY = "cond_stage_model.transformer.token_embedding.weight"


def own_text_encoder(model: LatentDiffusion) -> TextTransformer:
    """The model's jointly trained text transformer (the one with a word vocabulary); a ConfigError otherwise."""
    encoder = text_encoder_module(model)
    if not isinstance(encoder, TextTransformer):
        raise ConfigError("new_words adds words to the model's own word-level text encoder (text_encoder: "
                          "transformer), and this model has none: a CLIP or MiniLM tokenizer has a fixed vocabulary")
    return encoder


def resolve_new_words(requested: list[str], min_count: int, vocab: set[str],
                      captions: Callable[[], list[str]]) -> list[str]:
    """The words to add: ``auto``'s from the captions, or the requested ones (lower-cased as captions are), less
    those the vocabulary already has."""
    if requested == [AUTO]:
        words = [w for w in build_vocabulary(captions(), min_count) if w not in vocab]
        logger.info("new_words: auto adds %d words seen at least %d times in the training captions (%s)",
                    len(words), min_count, ", ".join(words[:10]) + (" ..." if len(words) > 10 else ""))
        return words
    words = []
    for word in requested:
        split = split_caption(word)
        if len(split) != 1:
            raise ConfigError(f"new_words: {word!r} is not one word (a caption reads it as {split})")
        if split[0] in vocab:
            logger.warning("new_words: %r is in the vocabulary already", split[0])
        elif split[0] not in words:
            words.append(split[0])
    seen = {w for caption in captions() for w in split_caption(caption)}
    unseen = [w for w in words if w not in seen]
    if unseen:
        logger.warning("new_words: %s never occur in the training captions, so their rows will not train",
                       ", ".join(unseen))
    return words


def base_section(section: LatentDiffusionConfig, words: list[str]) -> LatentDiffusionConfig:
    """The model section without the run's new words at the end of its vocabulary: what the base model has (a
    resumed LoRA run's saved config is checked against its base, which is loaded again)."""
    text = getattr(section.conditioner, "text", None) if section.conditioner is not None else None
    if not words or text is None or text.vocab[-len(words):] != words:
        return section
    trimmed = copy.deepcopy(section)
    trimmed.conditioner.text.vocab = text.vocab[:-len(words)]
    return trimmed


def _train_new_rows_only(encoder: TextTransformer, old_rows: int, weight_decay: float) -> None:
    """Let the embedding train with its gradient masked to the rows from ``old_rows`` on."""
    if weight_decay:
        raise ConfigError(f"new_words with a frozen or LoRA-adapted text encoder trains only the new embedding rows, "
                          f"which needs train.weight_decay: 0 (it is {weight_decay}: AdamW would shrink the old rows)")
    weight = encoder.token_embedding.weight
    keep = (torch.arange(len(weight), device=weight.device) >= old_rows)[:, None]
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * keep.to(grad.device, grad.dtype))


def add_new_words(model: LatentDiffusion, requested: list[str], min_count: int, init_word: str,
                  captions: Callable[[], list[str]], built_with_them: bool, weight_decay: float) -> list[str]:
    """Grow ``model``'s vocabulary by the requested words (see the module docstring) and make their rows
    trainable; ``built_with_them``: the model was built from a config that has them (a resumed full fine-tune).
    Returns the words added, which the run's config records in place of ``auto``."""
    encoder = own_text_encoder(model)
    if built_with_them:
        words = list(requested)
        if encoder.config.vocab[-len(words):] != words:
            raise ConfigError(f"the run's vocabulary does not end with its new_words {words}: it cannot be resumed")
    else:
        words = resolve_new_words(requested, min_count, set(encoder.tokenizer.ids), captions)
        init = split_caption(init_word)[0] if split_caption(init_word) else ""
        try:
            encoder.add_words(words, init)
        except ValueError as e:
            raise ConfigError(f"new_words: {e}") from e
        logger.info("text vocabulary: %d words, %d of them new (%s), initialised from %s", len(encoder.config.vocab),
                    len(words), ", ".join(words[:10]), repr(init) if init else "the mean word embedding")
    if words and not encoder.token_embedding.weight.requires_grad:
        _train_new_rows_only(encoder, encoder.tokenizer.vocab_size - len(words), weight_decay)
    return words


def restore_embedding(model: LatentDiffusion, weights: dict[str, torch.Tensor]) -> None:
    """Put the saved token embedding (with its trained new rows) back: a resumed LoRA run's base is the original."""
    own_text_encoder(model).token_embedding.weight.data.copy_(weights[EMBEDDING_KEY])


__all__ = ["AUTO", "add_new_words", "base_section", "resolve_new_words", "restore_embedding"]
