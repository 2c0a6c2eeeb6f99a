"""A small transformer text encoder trained jointly with the UNet from scratch, and its word-level tokenizer.

This is the LDM paper's text model (Rombach et al. 2022, sec. 4.3.1: a transformer trained from scratch with the
diffusion model on LAION captions, CompVis' ``BERTEmbedder``), scaled down: learned token and position
embeddings, a few pre-LayerNorm layers (x + attn(LN(x)), x + mlp(LN(x)), GELU) whose attention keeps padding keys
out, a final LayerNorm. Its output (N, L, width) and mask (N, L) are the UNet's cross-attention context.

Why a word-level tokenizer whose vocabulary is built from the training captions: a model trained from scratch only
ever knows the words its captions use, so a learned subword vocabulary (BERT's 30k entries, CompVis' choice) would
be almost all dead rows, while bytes would make sequences 4-5x longer (and cross-attention over them slower) and
force the small encoder to learn spelling before meaning. Words keep prompts short ("a red sneaker on the left"
is 6 tokens) and every embedding row is trained. The cost is that a word never seen in training is ``[UNK]``;
for a closed-vocabulary dataset (the Fashion-MNIST scenes) that is exactly right, and ``min_count`` /
``max_size`` bound the vocabulary of an open one. The vocabulary is part of ``TextTransformerConfig``, which is
saved with the model's config, so a checkpoint rebuilds the same tokenizer with nothing else.

Words: the text is NFKC-normalised and lower-cased; a word is a run of letters and digits, with inner hyphens and
apostrophes kept ("t-shirt", "don't"); any other non-space character is a token of its own. Ids: ``[PAD]`` 0,
``[UNK]`` 1, ``[BOS]`` 2, ``[EOS]`` 3, then the vocabulary; a row is ``[BOS] words [EOS]`` padded to
``max_length`` (truncated with a WARNING, ``[EOS]`` kept last).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.nn.onednn import Linear

logger = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
_WORD = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*|[^\w\s]|_")


def split_caption(text: str) -> list[str]:
    """NFKC, lower case, then words (letters/digits with inner ' and -) and single punctuation characters."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def build_vocabulary(captions: Iterable[str], min_count: int = 1, max_size: int = 0) -> list[str]:
    """The words of ``captions``, most frequent first (ties alphabetically, so the result is deterministic),
    those seen at least ``min_count`` times, at most ``max_size`` of them (0: all)."""
    counts = Counter(word for caption in captions for word in split_caption(caption))
    words = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
                   key=lambda w: (-counts[w], w))
    return words[:max_size] if max_size > 0 else words


class WordTokenizer:
    """Captions -> ``(ids (N, max_length) int64, mask (N, max_length) bool)`` over a fixed word vocabulary."""

    pad_token_id, unk_token_id, bos_token_id, eos_token_id = 0, 1, 2, 3

    def __init__(self, vocab: Sequence[str], max_length: int = 32) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [BOS] and [EOS], got {max_length}")
        tokens = [*SPECIAL_TOKENS, *vocab]
        if len(set(tokens)) != len(tokens):
            raise ValueError("the vocabulary has repeated words or special tokens")
        self.tokens = tokens
        self.ids = {token: i for i, token in enumerate(tokens)}
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def text_to_ids(self, text: str) -> list[int]:
        return [self.ids.get(word, self.unk_token_id) for word in split_caption(text)]

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` (as ``split_caption`` splits them) that are not in the vocabulary and become
        ``[UNK]``, each once, in the order they first appear."""
        return list(dict.fromkeys(word for word in split_caption(text) if word not in self.ids))

    def encode(self, captions: str | Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            captions = [captions]
        length = self.max_length if max_length is None else max_length
        ids = torch.full((len(captions), length), self.pad_token_id, dtype=torch.long)
        for row, caption in enumerate(captions):
            words = self.text_to_ids(caption)
            if len(words) > length - 2:
                logger.warning("caption %d has %d words, more than the %d that fit between [BOS] and [EOS]; "
                               "truncated, dropping: %r", row, len(words), length - 2, self.decode(words[length - 2:]))
                words = words[: length - 2]
            words = [self.bos_token_id, *words, self.eos_token_id]
            ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
        return ids, ids != self.pad_token_id

    __call__ = encode

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return " ".join(self.tokens[int(i)] for i in ids if int(i) not in (self.pad_token_id, self.bos_token_id,
                                                                            self.eos_token_id))


@dataclass
class TextTransformerConfig:
    """The jointly trained text encoder. ``vocab`` is filled from the training captions by the trainer (see
    ``build_vocabulary``) and saved here, so a checkpoint rebuilds its tokenizer; ``vocab_min_count`` and
    ``vocab_max_size`` say how it is built."""

    vocab: list[str] = field(default_factory=list)
    max_length: int = 32
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    vocab_min_count: int = 1
    vocab_max_size: int = 0

    def __post_init__(self) -> None:
        self.vocab = list(self.vocab)
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} does not split into {self.heads} heads")
        for name in ("max_length", "width", "layers", "heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"text encoder {name} must be positive, got {getattr(self, name)}")
        if self.max_length < 2:
            raise ValueError(f"text max_length must leave room for [BOS] and [EOS], got {self.max_length}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"text dropout must be in [0, 1), got {self.dropout}")

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.vocab)


class TextBlock(nn.Module):
    """Pre-LayerNorm transformer layer with a padding mask on the keys."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(Linear(width, mlp_ratio * width), nn.GELU(), nn.Dropout(dropout),
                                 Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(h.transpose(1, 2).reshape(b, length, width))
        return x + self.mlp(self.norm2(x))


class TextTransformer(nn.Module):
    """Captions (or ids) -> (states (N, max_length, width), mask (N, max_length) bool). Trained from scratch."""

    def __init__(self, config: TextTransformerConfig) -> None:
        super().__init__()
        if not config.vocab:
            raise ValueError("the text encoder has an empty vocabulary: build it from the training captions "
                             "(latentdiff.conditioning.text.build_vocabulary; the trainer does this) or list it in "
                             "model.conditioner.text.vocab")
        self.config = config
        self.tokenizer = WordTokenizer(config.vocab, config.max_length)
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.empty(config.max_length, config.width))
        self.blocks = nn.ModuleList(TextBlock(config.width, config.heads, config.mlp_ratio, config.dropout)
                                    for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    def tokenize(self, captions: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(captions)

    @torch.no_grad()
    def add_words(self, words: Sequence[str], init_word: str = "") -> None:
        """Append ``words`` to the vocabulary (``config.vocab``, so that the saved config holds them), each with a
        new row of the token embedding: a copy of ``init_word``'s row, or the mean of the vocabulary words' rows.
        Every old id and row stays as it was, so old prompts encode exactly as before. A word must be one word as
        ``split_caption`` reads it (lower case, no spaces) and new to the vocabulary."""
        ids = self.tokenizer.ids
        for word in words:
            if split_caption(word) != [word] or word in ids:
                raise ValueError(f"cannot add {word!r} to the text vocabulary: "
                                 + ("it is there already" if word in ids else "not one lower-case word"))
        if len(set(words)) != len(words):
            raise ValueError(f"the new words repeat a word: {', '.join(words)}")
        if init_word and init_word not in ids:
            raise ValueError(f"the new words' initial embedding word {init_word!r} is not in the vocabulary")
        old = self.token_embedding.weight
        init = old[ids[init_word]] if init_word else old[len(SPECIAL_TOKENS):].mean(0)
        grown = nn.Embedding(len(old) + len(words), self.config.width, device=old.device, dtype=old.dtype)
        grown.weight.copy_(torch.cat([old, init.expand(len(words), -1)]))
        grown.weight.requires_grad_(old.requires_grad)
        self.token_embedding = grown
        self.config.vocab.extend(words)
        self.tokenizer = WordTokenizer(self.config.vocab, self.config.max_length)

    def encode_ids(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids.dim() != 2 or input_ids.shape[1] > self.config.max_length:
            raise ValueError(f"input_ids must be (N, L <= {self.config.max_length}), got {tuple(input_ids.shape)}")
        input_ids = input_ids.to(self.token_embedding.weight.device)
        mask = input_ids != self.tokenizer.pad_token_id
        x = self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x), mask

    def forward(self, captions: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, _ = self.tokenize(captions)
        return self.encode_ids(ids)


__all__ = ["SPECIAL_TOKENS", "TextTransformer", "TextTransformerConfig", "WordTokenizer", "build_vocabulary",
           "split_caption"]
