"""The CLIP tokenizer: byte-level BPE over lower-cased, cleaned text, ids framed by start/end tokens.

This is the tokenizer of OpenAI CLIP, which Stable Diffusion v1 (through Hugging Face's copy) and v2 (through
OpenCLIP's copy) both use; the two differ only in the id used for padding. The merge table is the file
``bpe_simple_vocab_16e6.txt.gz`` that ships inside the ``open_clip_torch`` package, found here without importing
``open_clip`` (its package needs torchvision); a Hugging Face / diffusers ``tokenizer/`` folder (``vocab.json`` +
``merges.txt``) works too.

From text to ids:

1. clean: ``ftfy.fix_text`` (mojibake and other broken Unicode repaired, then NFC, as CLIP's reference does),
   HTML entities unescaped twice (captions scraped from the web are often escaped twice), runs of whitespace
   collapsed to one space, lower case;
2. split into words: the special tokens, the English contractions ``'s 't 're 've 'm 'll 'd``, runs of letters,
   single digits (so ``3.14`` is four words and numbers never merge), runs of anything else (punctuation, emoji);
3. each word becomes its UTF-8 bytes, each byte a printable stand-in character, and the BPE merges join them,
   lowest rank first, with ``</w>`` marking the end of the word;
4. ``<|startoftext|>`` (49406) + ids + ``<|endoftext|>`` (49407), truncated to the context length (the end token
   kept last, and a warning logged) and padded.

Added words (``add_word``: a textual-inversion embedding's trigger) are cut out of the cleaned text before step 2
and become their own ids, after the vocabulary's, as Hugging Face's added tokens do; a word of n vectors becomes n
tokens, ``word``, ``word_1``, ... (diffusers' names for them).
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib
import json
import logging
import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from latentdiff.conditioning import package_folders

logger = logging.getLogger(__name__)

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
# The merge file holds more merges than CLIP uses: CLIP keeps the first 49152 - 256 - 2 of them, so that with the
# 256 byte symbols and the two special tokens its vocabulary is 49408 entries (its token embedding's size).
NUM_MERGES = 49152 - 256 - 2
CONTEXT_LENGTH = 77
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_WORD_END = "</w>"


@functools.cache
def _ftfy():  # noqa: ANN202 (the ftfy module)
    """ftfy, imported on first use: it takes a tenth of a second, which a command whose model has no CLIP text
    encoder (the bundled ones) need not pay."""
    return importlib.import_module("ftfy")


class TokenizedText(NamedTuple):
    """Token ids (N, L) int64 and their attention mask (N, L) int64: 1 for real tokens, 0 for padding."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> character table of byte-level BPE (GPT-2, CLIP).

    BPE works on strings, and the merge file is text, so every byte needs a visible, non-space character: the 188
    printable Latin-1 bytes stand for themselves, the other 68 (controls, space, soft hyphen...) are shifted to
    U+0100 onwards. The order of this dict (printable first, then the shifted ones) is the order of the first 256
    vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for offset, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + offset)
    return table


def default_vocab_path() -> Path:
    """Where ``open_clip_torch`` keeps the CLIP merge file, found without importing ``open_clip``.

    ``find_spec`` of a top-level name locates the package without running its ``__init__`` (which needs
    torchvision), so installing open_clip_torch with ``--no-deps`` is enough.
    """
    installed, folders = package_folders("open_clip")
    for folder in folders:
        candidate = Path(folder) / VOCAB_FILE_NAME
        if candidate.is_file():
            return candidate
    where = "is not installed" if not installed else f"has no {VOCAB_FILE_NAME} in {folders}"
    raise FileNotFoundError(
        f"the CLIP BPE vocabulary ({VOCAB_FILE_NAME}) was not found: the open_clip package {where}. Install it "
        "with `pip install --no-deps open_clip_torch`, or pass the path of the file (or of a tokenizer folder "
        "holding vocab.json and merges.txt) to CLIPTokenizer"
    )


def _char_kind(ch: str) -> str:
    """'L' letter, 'N' number, ' ' whitespace, 'P' anything else: the classes CLIP's word pattern is built from."""
    if ch.isspace():
        return " "
    major = unicodedata.category(ch)[0]
    return major if major in ("L", "N") else "P"


def split_words(text: str) -> list[str]:
    """Split cleaned text into the words that BPE is applied to, exactly as CLIP's regular expression does.

    CLIP's pattern is ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
    (over lower-cased text); written out as a scanner it needs no third-party ``regex`` module for ``\\p{...}``.
    As in a regex, the alternatives are only tried where a word starts: a run of punctuation swallows an
    apostrophe or a ``<|`` that follows it.
    """
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        kind = _char_kind(text[i])
        if kind == " ":
            i += 1
            continue
        special = next((t for t in (START_TOKEN, END_TOKEN) if text.startswith(t, i)), None)
        if special is None and text[i] == "'":
            special = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
        if special is not None:
            words.append(special)
            i += len(special)
            continue
        j = i + 1
        if kind != "N":  # letters and punctuation run on; a digit is a word of its own
            while j < n and _char_kind(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


class CLIPTokenizer:
    """The CLIP byte-level BPE tokenizer: ``tokenizer(prompts)`` -> ``TokenizedText(input_ids, attention_mask)``.

    ``vocab`` is the CLIP merge file (``bpe_simple_vocab_16e6.txt.gz``, or the same uncompressed), a tokenizer
    folder with ``vocab.json`` + ``merges.txt`` (diffusers' ``tokenizer/``; a pipeline folder holding one works
    too), or None for the copy inside the installed ``open_clip_torch`` package.

    ``pad_token_id`` is what fills the sequence after the end token: Stable Diffusion v1 pads with the end token
    itself (49407, Hugging Face's choice), OpenCLIP and so SD v2 with 0 (the id of ``!``). The text encoder's causal
    attention means the padding never changes the real tokens' features, but the UNet attends to all 77 positions,
    so the padding a model was trained with must be kept. None takes the folder's own ``pad_token`` when it names
    one, else the end token.
    """

    def __init__(self, vocab: str | Path | None = None, pad_token_id: int | None = None,
                 max_length: int = CONTEXT_LENGTH) -> None:
        path = default_vocab_path() if vocab is None else Path(vocab)
        if path.is_dir() and not (path / "vocab.json").is_file() and (path / "tokenizer" / "vocab.json").is_file():
            path = path / "tokenizer"
        folder_pad_token = None
        if path.is_dir():
            self.encoder, merges = self._read_folder(path)
            folder_pad_token = self._folder_pad_token(path)
        elif path.is_file():
            self.encoder, merges = self._read_merge_file(path)
        else:
            raise FileNotFoundError(
                f"no CLIP vocabulary at {path}: pass the {VOCAB_FILE_NAME} file, a tokenizer folder with vocab.json "
                "and merges.txt, or nothing to use the copy inside open_clip_torch (`pip install --no-deps "
                "open_clip_torch`)"
            )
        for token in (START_TOKEN, END_TOKEN):
            if token not in self.encoder:
                raise ValueError(f"the vocabulary at {path} has no {token} entry; is it a CLIP vocabulary?")
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_token_id = self.encoder[START_TOKEN]
        self.eos_token_id = self.encoder[END_TOKEN]
        if pad_token_id is None:
            pad_token_id = self.encoder.get(folder_pad_token, self.eos_token_id)
        if not 0 <= pad_token_id < len(self.encoder):
            raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary (0..{len(self.encoder) - 1})")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {max_length}")
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self._byte_chars = byte_to_unicode()
        self._char_bytes = {c: b for b, c in self._byte_chars.items()}
        # Prompts repeat the same words endlessly; a bounded cache keeps a long training run's memory flat.
        self._bpe_cached = functools.lru_cache(maxsize=1 << 16)(self._bpe)
        self.added_words: dict[str, list[int]] = {}
        self._added_pattern: re.Pattern[str] | None = None

    @property
    def vocab_size(self) -> int:
        """The vocabulary's entries and the added words' tokens: the text encoder's embedding must have as many."""
        return len(self.encoder) + sum(len(ids) for ids in self.added_words.values())

    def add_word(self, word: str, count: int = 1) -> list[int]:
        """Make ``word`` ``count`` new tokens (``word``, ``word_1``, ...) with the next free ids, and return them.

        The word is matched in the cleaned (lower-cased) text wherever it occurs, even inside a longer word, as
        Hugging Face's added tokens are. Raises ``ValueError`` for a word already added or one the cleaning changes.
        """
        if count < 1:
            raise ValueError(f"a word needs at least one token, got {count}")
        key = self.clean(word)
        if not key or key != word.lower() or " " in key:
            raise ValueError(f"{word!r} cannot be an added word: it must be one word that cleaning leaves as it is")
        if key in self.added_words:
            raise ValueError(f"the word {word!r} was already added to the tokenizer")
        first = self.vocab_size
        ids = list(range(first, first + count))
        names = [key] + [f"{key}_{i}" for i in range(1, count)]
        self.decoder.update({i: "".join(self._byte_chars[b] for b in name.encode("utf-8")) + _WORD_END
                             for i, name in zip(ids, names, strict=True)})
        self.added_words[key] = ids
        longest_first = sorted(self.added_words, key=len, reverse=True)
        self._added_pattern = re.compile("|".join(map(re.escape, longest_first)))
        return ids

    # ---- vocabulary files -------------------------------------------------------------------------------------

    def save_folder(self, folder: str | Path) -> Path:
        """Write this tokenizer as a Hugging Face ``tokenizer/`` folder (``vocab.json``, ``merges.txt``,
        ``tokenizer_config.json``, ``special_tokens_map.json``) that transformers' ``CLIPTokenizer`` loads with the
        same ids, padding included. Each file is written to a temporary name and renamed."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        special = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN,
                   "pad_token": self.decoder[self.pad_token_id]}
        merges = sorted(self.merge_ranks, key=self.merge_ranks.__getitem__)
        files = {
            "vocab.json": json.dumps(self.encoder, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
            "special_tokens_map.json": json.dumps(special, indent=2),
            "tokenizer_config.json": json.dumps(dict(special, model_max_length=self.max_length, do_lower_case=True,
                                                     tokenizer_class="CLIPTokenizer"), indent=2),
        }
        for name, text in files.items():
            tmp = folder / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, folder / name)
        return folder

    @staticmethod
    def _read_merge_file(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """CLIP's own format: a header line, then one merge ("a b") per line; the vocabulary is derived from it."""
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path} is not a CLIP BPE merge file: expected a header and at least {NUM_MERGES} "
                             "lines of two symbols each")
        symbols = list(byte_to_unicode().values())
        vocab = symbols + [s + _WORD_END for s in symbols] + ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
        return {token: i for i, token in enumerate(vocab)}, merges

    @staticmethod
    def _read_folder(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """The Hugging Face layout: ``vocab.json`` (token -> id) and ``merges.txt`` (a ``#version`` header, merges)."""
        vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
        for file in (vocab_file, merges_file):
            if not file.is_file():
                raise FileNotFoundError(f"tokenizer folder {path} has no {file.name}")
        encoder = json.loads(vocab_file.read_text(encoding="utf-8"))
        merges = []
        for line in merges_file.read_text(encoding="utf-8").split("\n"):
            if not line.strip() or line.startswith("#version"):
                continue
            pair = tuple(line.split())
            if len(pair) != 2:
                raise ValueError(f"{merges_file}: a merge must be two symbols, got {line!r}")
            merges.append(pair)
        return encoder, merges

    @staticmethod
    def _folder_pad_token(path: Path) -> str | None:
        # diffusers' SD 2 tokenizer folder names "!" (id 0) here, SD 1's names <|endoftext|>.
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            file = path / name
            if file.is_file():
                pad = json.loads(file.read_text(encoding="utf-8")).get("pad_token")
                if isinstance(pad, dict):
                    pad = pad.get("content")
                if isinstance(pad, str):
                    return pad
        return None

    # ---- text -> words -> BPE symbols -> ids ------------------------------------------------------------------

    def clean(self, text: str) -> str:
        """Fix the encoding (ftfy), unescape HTML twice, collapse whitespace, lower-case."""
        text = _ftfy().fix_text(text)
        text = html.unescape(html.unescape(text))
        return " ".join(text.split()).lower()

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Merge the characters of a byte-encoded word, always joining the best-ranked adjacent pair next."""
        symbols = [*word[:-1], word[-1] + _WORD_END]
        while len(symbols) > 1:
            rank, at = min((self.merge_ranks.get(pair, len(self.merge_ranks)), i)
                           for i, pair in enumerate(zip(symbols, symbols[1:], strict=False)))
            if rank == len(self.merge_ranks):
                break  # no adjacent pair is a known merge
            first, second = symbols[at], symbols[at + 1]
            merged: list[str] = []
            i = 0
            while i < len(symbols):  # every occurrence of the pair, left to right, without overlap
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def text_to_ids(self, text: str) -> list[int]:
        """The ids of one text, without start/end tokens, padding or truncation."""
        text = self.clean(text)
        if self._added_pattern is None:
            return self._bpe_ids(text)
        ids: list[int] = []
        start = 0
        for found in self._added_pattern.finditer(text):
            ids += self._bpe_ids(text[start:found.start()]) + self.added_words[found.group()]
            start = found.end()
        return ids + self._bpe_ids(text[start:])

    def _bpe_ids(self, text: str) -> list[int]:
        """The BPE ids of cleaned text."""
        ids: list[int] = []
        for word in split_words(text):
            if word in (START_TOKEN, END_TOKEN):
                ids.append(self.encoder[word])
                continue
            for symbol in self._bpe_cached("".join(self._byte_chars[b] for b in word.encode("utf-8"))):
                if symbol not in self.encoder:
                    raise ValueError(f"BPE produced {symbol!r}, which the vocabulary lacks: mismatched vocab/merges")
                ids.append(self.encoder[symbol])
        return ids

    def encode(self, prompts: str | Sequence[str], max_length: int | None = None) -> TokenizedText:
        """Tokenize prompts to ``(N, max_length)`` ids framed by start/end tokens, padded, with an attention mask.

        A prompt longer than ``max_length - 2`` tokens is cut, keeping the end token last (the pooled feature and
        the models' training expect it), and the dropped text is logged as a warning.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.max_length if max_length is None else max_length
        if length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {length}")
        input_ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids = self.text_to_ids(prompt)
            if len(ids) > length - 2:
                dropped = ids[length - 2:]
                logger.warning("prompt %d is %d tokens long, more than the %d that fit between the start and end "
                               "tokens; truncated, dropping: %r", row, len(ids), length - 2, self.decode(dropped))
                ids = ids[:length - 2]
            ids = [self.bos_token_id, *ids, self.eos_token_id]
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        return TokenizedText(input_ids, attention_mask)

    __call__ = encode

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text back from ids: a start token is skipped, and decoding stops at the first end token.

        Stopping there makes a padded row decode the same whichever padding id it was made with (SD v2's pad id 0
        is the ``!`` token, which cannot be told apart from a real one).
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        symbols = []
        for i in ids:
            if i == self.eos_token_id:
                break
            if i != self.bos_token_id:
                symbols.append(self.decoder[int(i)])
        # "</w>" is made of printable bytes, so it survives the byte decoding and becomes a space after it.
        data = bytes(self._char_bytes[c] for c in "".join(symbols))
        return data.decode("utf-8", errors="replace").replace(_WORD_END, " ").strip()
