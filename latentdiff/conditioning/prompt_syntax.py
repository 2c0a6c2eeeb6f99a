"""AUTOMATIC1111's prompt syntax: attention weights, ``BREAK``, and prompts longer than one CLIP context in chunks.

The syntax, as A1111's web UI reads it (``modules/prompt_parser.py``, ``modules/sd_hijack_clip.py``):

- ``(text)`` multiplies the attention to ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` multiplies it
  by 1.3; nested brackets multiply (``((text))`` is 1.21). A bracket left open applies to the end of the prompt; a
  closing bracket without its opening one is plain text.
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters.
- ``BREAK`` (upper case, a word of its own) ends the current chunk: the rest of it is padding.

A prompt becomes chunks of ``chunk_length`` tokens (75 for CLIP's 77-token context), each framed as
``[BOS] + tokens + [EOS]`` and padded. When a chunk fills up and a comma came within the last ``comma_backtrack``
tokens, the words after that comma move to the next chunk (A1111's "prompt word wrap length limit", default 20), so
a phrase is not cut in two. Each chunk is encoded on its own and the encodings are concatenated along the sequence;
the weights then scale each token's encoding, and the chunk is rescaled to keep its mean (A1111's "Original"
emphasis).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from latentdiff.conditioning.tokenizer import CLIPTokenizer

ROUND_BRACKET_WEIGHT = 1.1
SQUARE_BRACKET_WEIGHT = 1 / 1.1
COMMA_BACKTRACK = 20  # A1111's default "prompt word wrap length limit" (comma_padding_backtrack)

# One token of the syntax per match: an escape, a bracket, ":weight)" closing a weighted bracket, a run of plain
# text, or a lone colon (plain text too).
_ATTENTION_TOKEN = re.compile(r"""
    \\[()\[\]\\] | \\
  | \( | \[
  | :\s*([+-]?[.\d]+)\s*\)
  | \) | \]
  | [^\\()\[\]:]+
  | :
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


class PromptSyntaxError(ValueError):
    """A prompt the attention syntax cannot read (a weight that is not a number)."""


class WeightedText(NamedTuple):
    """A run of prompt text and the attention multiplier of its tokens."""

    text: str
    weight: float


class ChunkBreak(NamedTuple):
    """Where the prompt said ``BREAK``: the current chunk ends here."""


BREAK = ChunkBreak()


def parse_prompt_attention(text: str) -> list[WeightedText | ChunkBreak]:
    """The prompt as runs of text with their weights, and ``BREAK`` markers; neighbouring runs of one weight merge.

    ``"an (important) word"`` -> ``[("an ", 1.0), ("important", 1.1), (" word", 1.0)]``; an empty prompt is
    ``[("", 1.0)]``.
    """
    parts: list[list] = []  # [text, weight] pairs, mutable while brackets close; None text marks a BREAK
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for part in parts[start:]:
            if part[0] is not None:
                part[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(parts))
        elif token == "[":
            open_square.append(len(parts))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), _parse_weight(weight, text))
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_BRACKET_WEIGHT)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_BRACKET_WEIGHT)
        else:
            for i, piece in enumerate(_BREAK.split(token)):
                if i:
                    parts.append([None, 1.0])
                parts.append([piece, 1.0])
    for start in open_round:
        multiply_from(start, ROUND_BRACKET_WEIGHT)
    for start in open_square:
        multiply_from(start, SQUARE_BRACKET_WEIGHT)
    return _merged(parts)


def _parse_weight(weight: str, prompt: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise PromptSyntaxError(f"attention weight {weight!r} is not a number in prompt {prompt!r}") from None


def _merged(parts: list[list]) -> list[WeightedText | ChunkBreak]:
    """Join neighbouring runs of the same weight (BREAKs never join), as A1111 does before tokenizing; empty runs
    (beside a BREAK) are left out, as they hold no tokens."""
    out: list[WeightedText | ChunkBreak] = []
    for text, weight in parts:
        if text == "":
            continue
        if text is None:
            out.append(BREAK)
        elif out and isinstance(out[-1], WeightedText) and out[-1].weight == weight:
            out[-1] = WeightedText(out[-1].text + text, weight)
        else:
            out.append(WeightedText(text, weight))
    return out or [WeightedText("", 1.0)]


@dataclass
class PromptChunk:
    """One encoder call's worth of a prompt: ``ids`` framed and padded to the context, a weight for each."""

    ids: list[int]
    weights: list[float]


class _ChunkWriter:
    """Fills chunks token by token, as A1111's ``tokenize_line`` does, moving words past a late comma on."""

    def __init__(self, tokenizer: CLIPTokenizer, comma_backtrack: int) -> None:
        self.tokenizer = tokenizer
        self.length = tokenizer.max_length - 2
        self.comma_backtrack = comma_backtrack
        self.comma_id = tokenizer.encoder.get(",</w>")
        self.chunks: list[PromptChunk] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.last_comma = -1

    def close(self) -> None:
        tok = self.tokenizer
        ids = [tok.bos_token_id, *self.ids, tok.eos_token_id]
        ids += [tok.pad_token_id] * (self.length + 2 - len(ids))
        weights = [1.0, *self.weights] + [1.0] * (self.length + 1 - len(self.weights))
        self.chunks.append(PromptChunk(ids, weights))
        self.ids, self.weights, self.last_comma = [], [], -1

    def add(self, token: int, weight: float) -> None:
        if token == self.comma_id:
            self.last_comma = len(self.ids)
        elif (self.comma_backtrack and len(self.ids) == self.length and self.last_comma != -1
              and len(self.ids) - self.last_comma <= self.comma_backtrack):
            cut = self.last_comma + 1
            moved_ids, moved_weights = self.ids[cut:], self.weights[cut:]
            self.ids, self.weights = self.ids[:cut], self.weights[:cut]
            self.close()
            self.ids, self.weights = moved_ids, moved_weights
        if len(self.ids) == self.length:
            self.close()
        self.ids.append(token)
        self.weights.append(weight)


def prompt_chunks(prompt: str, tokenizer: CLIPTokenizer, comma_backtrack: int = COMMA_BACKTRACK
                  ) -> list[PromptChunk]:
    """The chunks of one prompt, each ``tokenizer.max_length`` ids long (77 for CLIP), at least one.

    A prompt of at most ``max_length - 2`` tokens without ``BREAK`` is one chunk holding exactly the ids
    ``tokenizer(prompt)`` gives; ``comma_backtrack`` 0 cuts chunks at the token count alone.
    """
    writer = _ChunkWriter(tokenizer, comma_backtrack)
    for part in parse_prompt_attention(prompt):
        if isinstance(part, ChunkBreak):
            writer.close()
            continue
        for token in tokenizer.text_to_ids(part.text):
            writer.add(token, part.weight)
    if writer.ids or not writer.chunks:
        writer.close()
    return writer.chunks


def empty_chunk(tokenizer: CLIPTokenizer) -> PromptChunk:
    """The chunk of the empty prompt, which pads a shorter prompt to another's number of chunks."""
    return prompt_chunks("", tokenizer)[0]


def stack_chunks(prompts: Sequence[list[PromptChunk]], num_chunks: int, tokenizer: CLIPTokenizer
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (N, num_chunks, L) int64 and weights (N, num_chunks, L) float32, each prompt padded with empty chunks."""
    longest = max(len(chunks) for chunks in prompts)
    if num_chunks < longest:
        raise ValueError(f"a prompt has {longest} chunks, more than the {num_chunks} asked for")
    padded = [[*chunks, *[empty_chunk(tokenizer)] * (num_chunks - len(chunks))] for chunks in prompts]
    ids = torch.tensor([[chunk.ids for chunk in chunks] for chunks in padded], dtype=torch.long)
    weights = torch.tensor([[chunk.weights for chunk in chunks] for chunks in padded], dtype=torch.float32)
    return ids, weights


def apply_emphasis(context: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's encoding (N, L, D) by its weight (N, L), then each row back to its own mean.

    A1111's "Original" emphasis takes the mean over the whole batch of one chunk; here it is each prompt's chunk on
    its own, so that an image does not depend on the other prompts of its batch (equal for a batch of one).
    Unweighted rows are returned untouched, bit for bit. A row whose weighted mean is exactly 0 (a text encoder
    whose final LayerNorm has no bias, as a freshly initialised one) is left scaled but not renormalised, where
    A1111 would divide by zero.
    """
    if bool((weights == 1).all()):
        return context
    original_mean = context.mean(dim=(1, 2), keepdim=True)
    scaled = context * weights[..., None].to(context.dtype)
    new_mean = scaled.mean(dim=(1, 2), keepdim=True)
    return scaled * torch.where(new_mean == 0, 1.0, original_mean / new_mean)
