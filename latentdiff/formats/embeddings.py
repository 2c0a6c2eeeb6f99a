"""Textual-inversion embedding files: the learned token vectors that A1111 and diffusers load into CLIP's vocabulary.

Three layouts are read, each a word (the trigger) and its vectors [n, width]:

- A1111 ``.pt``: a pickle with ``string_to_param = {"*": tensor}``, read only with ``torch.load(weights_only=True)``
  (``latentdiff.formats.weights.safe_torch_load``; a pickle that would run code is refused);
- A1111 ``.safetensors``: one tensor ``emb_params``;
- diffusers ``learned_embeds.safetensors`` / ``.bin``: ``{token: tensor}``, the token named inside the file.

A1111's files are triggered by their file name (the stem), as A1111 does; a diffusers file by the token it holds.
A multi-vector embedding becomes that many tokens, ``word``, ``word_1``, ``word_2``, ... (diffusers'
``load_textual_inversion`` names them so); the tokenizer turns the word into all of them.

``write_embedding`` writes the two safetensors layouts (a textual-inversion run saves both beside each checkpoint):
diffusers' ``learned_embeds.safetensors`` and A1111's ``<word>.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from latentdiff.formats.weights import safe_torch_load, save_safetensors_atomic
from latentdiff.io.errors import CheckpointError

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
EMBEDDING_FORMATS = ("diffusers", "a1111")
DIFFUSERS_EMBEDDING_FILE = "learned_embeds.safetensors"


def _as_vectors(tensor: object, path: Path, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2) or not tensor.numel():
        raise CheckpointError(f"{path}: {what} is not a vector or a [tokens, width] matrix of vectors")
    return tensor.detach().float().reshape(-1, tensor.shape[-1])


def _from_dict(content: dict, path: Path) -> dict[str, torch.Tensor]:
    if "string_to_param" in content:  # A1111 .pt
        params = content["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise CheckpointError(f"{path}: string_to_param must hold exactly one tensor")
        return {path.stem: _as_vectors(next(iter(params.values())), path, "string_to_param")}
    if "emb_params" in content:  # A1111 .safetensors
        return {path.stem: _as_vectors(content["emb_params"], path, "emb_params")}
    tensors = {k: v for k, v in content.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if len(tensors) != 1:  # diffusers' learned_embeds: {token: tensor}
        raise CheckpointError(f"{path} is not a textual-inversion embedding: it has no string_to_param or "
                              f"emb_params, nor a single {{token: tensor}} entry (keys: "
                              f"{', '.join(map(str, list(content)[:6]))})")
    (token, tensor), = tensors.items()
    return {token: _as_vectors(tensor, path, token)}


def read_embedding(path: str | Path) -> tuple[str, torch.Tensor]:
    """The trigger word and the vectors [n, width] of the embedding file at ``path``. Raises ``CheckpointError`` for a
    missing, unreadable or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"embedding file not found: {path}")
    if path.suffix not in EMBEDDING_SUFFIXES:
        raise CheckpointError(f"{path}: embeddings are {', '.join(EMBEDDING_SUFFIXES)} files")
    if path.suffix == ".safetensors":
        try:
            content: object = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e
    else:
        content = safe_torch_load(path)
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a textual-inversion embedding")
    (word, vectors), = _from_dict(content, path).items()
    if not word or any(c.isspace() for c in word):
        raise CheckpointError(f"{path}: the trigger word {word!r} must be one word without spaces")
    return word, vectors


def write_embedding(word: str, vectors: torch.Tensor, path: str | Path, format: str) -> Path:
    """Write the vectors [n, width] of ``word`` to the ``.safetensors`` ``path``: ``diffusers`` as ``{word: vectors}``
    (``load_textual_inversion`` reads the word from the file), ``a1111`` as ``emb_params`` (the trigger is the file
    name's stem, so name the file after the word). Written to a temporary name and renamed."""
    path = Path(path)
    if format not in EMBEDDING_FORMATS:
        raise ValueError(f"unknown embedding format {format!r}; choose one of {', '.join(EMBEDDING_FORMATS)}")
    if path.suffix != ".safetensors":
        raise ValueError(f"embeddings are written as .safetensors, got {path}")
    if not word or any(c.isspace() for c in word):
        raise ValueError(f"the trigger word {word!r} must be one word without spaces")
    vectors = vectors.detach().float().cpu().reshape(-1, vectors.shape[-1]).contiguous()
    tensors = {word: vectors} if format == "diffusers" else {"emb_params": vectors}
    metadata = {"name": word, "vectors": str(vectors.shape[0])} if format == "a1111" else {}
    return save_safetensors_atomic(tensors, path, metadata)


__all__ = ["DIFFUSERS_EMBEDDING_FILE", "EMBEDDING_FORMATS", "EMBEDDING_SUFFIXES", "read_embedding",
           "write_embedding"]
