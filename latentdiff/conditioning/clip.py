"""The CLIP text encoder that turns token ids into the cross-attention context of Stable Diffusion.

Token + learned position embeddings, a stack of pre-LayerNorm transformer layers with causal self-attention, and
a final LayerNorm. Stable Diffusion v1 uses OpenAI's ViT-L/14 text tower (quick-GELU) and takes the last layer;
v2 uses OpenCLIP's ViT-H/14 text tower (exact GELU) and takes the *penultimate* layer, still passed through the
final LayerNorm (Stability's ``FrozenOpenCLIPEmbedder(layer="penultimate")`` stops the loop over the residual
blocks one early and then applies ``ln_final``; diffusers stores the same model as a 23-layer text encoder).

Parameter names are Hugging Face ``CLIPTextModel``'s (``text_model.embeddings.token_embedding.weight``,
``text_model.encoder.layers.0.self_attn.q_proj.weight``, ``text_model.final_layer_norm.weight``...): SD v1
checkpoints store exactly these under ``cond_stage_model.transformer.``, and diffusers' ``text_encoder/`` folders
use them as they are. SD v2 checkpoints store OpenCLIP's layout under ``cond_stage_model.model.``;
``openclip_to_hf`` and ``hf_to_openclip`` convert between the two, and ``CLIPTextModel.load_weights`` accepts
either, prefixed or not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from latentdiff.io.errors import CheckpointError
from latentdiff.io.state import load_state_strict
from latentdiff.nn.onednn import Linear

logger = logging.getLogger(__name__)

ACTIVATIONS = ("quick_gelu", "gelu")
OUTPUT_LAYERS = ("last", "penultimate")
SD_V1_PREFIX = "cond_stage_model.transformer."  # Hugging Face names (SD v1.x)
SD_V2_PREFIX = "cond_stage_model.model."  # OpenCLIP names (SD v2.x)


@dataclass
class CLIPTextConfig:
    """Architecture of a CLIP text encoder. The defaults are SD v1's (OpenAI CLIP ViT-L/14 text tower).

    ``mlp_width`` None means ``4 * width``. ``output_layer`` picks what ``encode`` returns: the last layer, or the
    one before it (SD v2); either way through the final LayerNorm. In penultimate mode the last layer is still
    built, so an original SD v2 checkpoint (which stores all 24 layers) loads strictly; it is just never run.
    """

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int | None = None
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP, SD v1) or "gelu" (OpenCLIP, SD v2)
    layer_norm_eps: float = 1e-5
    output_layer: str = "last"  # "last" (SD v1) or "penultimate" (SD v2)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.output_layer not in OUTPUT_LAYERS:
            raise ValueError(f"output_layer must be one of {OUTPUT_LAYERS}, got {self.output_layer!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} does not split into {self.heads} heads")
        if self.layers < (2 if self.output_layer == "penultimate" else 1):
            raise ValueError(f"{self.layers} layers is too few for output_layer={self.output_layer!r}")
        for name in ("vocab_size", "context_length", "width", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def intermediate_size(self) -> int:
        return 4 * self.width if self.mlp_width is None else self.mlp_width

    @property
    def layers_run(self) -> int:
        """How many transformer layers ``encode`` runs before the final LayerNorm."""
        return self.layers - (1 if self.output_layer == "penultimate" else 0)

    @classmethod
    def sd_v1(cls, **overrides: Any) -> CLIPTextConfig:
        """SD v1.x: OpenAI CLIP ViT-L/14 text (123,060,480 parameters), quick-GELU, last layer."""
        base = cls(vocab_size=49408, context_length=77, width=768, layers=12, heads=12, mlp_width=3072,
                   activation="quick_gelu", output_layer="last")
        return dataclasses.replace(base, **overrides)

    @classmethod
    def sd_v2(cls, **overrides: Any) -> CLIPTextConfig:
        """SD v2.x: OpenCLIP ViT-H/14 text (24 layers, 352,984,064 parameters built; 23 run), GELU, penultimate."""
        base = cls(vocab_size=49408, context_length=77, width=1024, layers=24, heads=16, mlp_width=4096,
                   activation="gelu", output_layer="penultimate")
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any], **overrides: Any) -> CLIPTextConfig:
        """From a Hugging Face ``CLIPTextConfig`` dict (a ``config.json``; a full ``CLIPConfig``'s ``text_config``).

        Fields absent from the file take Hugging Face's defaults, because ``save_pretrained`` may leave defaults
        out. A diffusers SD v2 text encoder is stored with 23 layers: loaded here it is a 23-layer "last" model,
        which computes exactly the same as the 24-layer "penultimate" one.
        """
        hf = hf_config.get("text_config", hf_config)
        act = hf.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported CLIP hidden_act {act!r}; supported: {ACTIVATIONS}")
        fields = dict(vocab_size=hf.get("vocab_size", 49408), context_length=hf.get("max_position_embeddings", 77),
                      width=hf.get("hidden_size", 512), layers=hf.get("num_hidden_layers", 12),
                      heads=hf.get("num_attention_heads", 8), mlp_width=hf.get("intermediate_size", 2048),
                      activation=act, layer_norm_eps=hf.get("layer_norm_eps", 1e-5))
        return cls(**{**fields, **overrides})

    def to_hf(self) -> dict[str, Any]:
        """The matching Hugging Face ``CLIPTextConfig`` fields, for all ``layers`` (HF has no penultimate mode:
        take ``hidden_states[-2]`` through ``final_layer_norm``, or build it with ``layers - 1`` as diffusers does).
        """
        return dict(vocab_size=self.vocab_size, max_position_embeddings=self.context_length, hidden_size=self.width,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads,
                    intermediate_size=self.intermediate_size, hidden_act=self.activation,
                    layer_norm_eps=self.layer_norm_eps)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU; its weights were trained with it, so it must be kept."""
    return x * torch.sigmoid(1.702 * x)


def causal_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """A boolean (B, 1, L, L) mask, True where query i may attend to key j: j <= i and key j is not padding.

    A query that would see no key at all (left padding, an all-zero mask) is let attend to itself, so that the
    softmax is defined and every backend returns the same finite numbers; such a position is padding anyway.
    """
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask.to(torch.bool)[:, None, :]
    blind = ~allowed.any(dim=-1)
    allowed = allowed | (torch.eye(length, dtype=torch.bool, device=allowed.device) & blind[:, :, None])
    return allowed[:, None]


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (Hugging Face's split of OpenCLIP's in_proj)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = Linear(width, width)
        self.k_proj = Linear(width, width)
        self.v_proj = Linear(width, width)
        self.out_proj = Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` None is plain causal attention; else a boolean (B, 1, L, L) from ``causal_attention_mask``."""
        b, length, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, width))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)
        self.activation = quick_gelu if activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config.width, config.heads)
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config.width, config.intermediate_size, config.activation)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus a learned embedding per position (no position-id buffer: positions are 0..L-1)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.context_length, config.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPEncoder(nn.Module):
    """The stack of layers; a module of its own only so that parameter names read ``encoder.layers.N``."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """The CLIP text encoder: ``model.encode(input_ids)`` -> the context (N, L, width) the UNet attends to."""

    def __init__(self, config: CLIPTextConfig | None = None) -> None:
        super().__init__()
        self.config = CLIPTextConfig() if config is None else config
        self.text_model = CLIPTextTransformer(self.config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                clip_skip: int = 1) -> torch.Tensor:
        """Token ids (N, L), L <= context_length -> features (N, L, width) after the final LayerNorm.

        ``clip_skip`` N stops N - 1 layers before the model's output layer (A1111's "Clip skip": 1 is the usual
        output, 2 the layer before it), still through the final LayerNorm. It counts from the layer the model
        uses, so on SD v2 (penultimate) 2 takes the third layer from the end, as diffusers' ``clip_skip=1`` does.

        Stable Diffusion v1 and v2 were trained *without* an attention mask: causal attention already keeps the
        padding out of the real tokens' features, and the padding positions' own features (which the UNet does
        attend to) are what they were trained on. Pass ``attention_mask`` (N, L), 1 for tokens and 0 for padding,
        only for a model trained with one; it changes the features of the padding positions only.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.context_length:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed the context length {self.config.context_length}; "
                             "the tokenizer truncates prompts to it")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if not 1 <= clip_skip <= self.config.layers_run:
            raise ValueError(f"clip skip must be between 1 and {self.config.layers_run} (the layers this text "
                             f"encoder runs), got {clip_skip}")
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                                 f"{tuple(input_ids.shape)}")
            mask = causal_attention_mask(attention_mask.to(input_ids.device))
        tm = self.text_model
        x = tm.embeddings(input_ids)
        for layer in tm.encoder.layers[: self.config.layers_run - (clip_skip - 1)]:
            x = layer(x, mask)
        return tm.final_layer_norm(x)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               clip_skip: int = 1) -> torch.Tensor:
        """The cross-attention context (N, L, width); see ``forward`` about the attention mask and ``clip_skip``."""
        return self(input_ids, attention_mask, clip_skip)

    def add_token_embeddings(self, vectors: torch.Tensor) -> list[int]:
        """Grow the token embedding by the rows ``vectors`` [n, width] (a textual-inversion embedding) and return
        their ids, which follow the vocabulary's; ``config.vocab_size`` grows with it."""
        old = self.text_model.embeddings.token_embedding
        if vectors.dim() != 2 or vectors.shape[1] != self.config.width:
            raise ValueError(f"token vectors must be [n, {self.config.width}] for this text encoder, got "
                             f"{tuple(vectors.shape)}")
        grown = nn.Embedding(old.num_embeddings + vectors.shape[0], self.config.width,
                             device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            grown.weight.copy_(torch.cat([old.weight, vectors.to(old.weight)]))
        grown.requires_grad_(old.weight.requires_grad)
        self.text_model.embeddings.token_embedding = grown
        self.config.vocab_size = grown.num_embeddings
        return list(range(old.num_embeddings, grown.num_embeddings))

    # ---- weights -----------------------------------------------------------------------------------------------

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a text encoder's weights in either layout, strictly, with one clear error when they do not fit.

        Accepted: Hugging Face names (diffusers ``text_encoder/``; with or without the ``text_model.`` level, which
        transformers 5 no longer writes), OpenCLIP names (converted with ``openclip_to_hf``, keeping as many blocks
        as this model has), and either under its Stable Diffusion prefix (``cond_stage_model.transformer.`` for v1,
        ``cond_stage_model.model.`` for v2), so a whole SD checkpoint can be passed: only the keys under the prefix
        are read. The position-id buffer some checkpoints carry is ignored (positions are always 0..L-1;
        some merged SD v1 files hold it rounded wrongly as floats). Parts of CLIP the text encoder does not use
        (vision tower, projections, logit scale) are dropped with a log line.
        """
        for prefix in (SD_V1_PREFIX, SD_V2_PREFIX):
            if any(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
                break
        if is_openclip_layout(state_dict):
            state_dict = openclip_to_hf(state_dict, num_layers=self.config.layers)
        else:
            state_dict = _drop_unused_hf_keys(state_dict)
        load_state_strict(self, state_dict, "CLIP text encoder")

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> CLIPTextModel:
        """Load a Hugging Face / diffusers text encoder folder (``config.json`` + ``model.safetensors``).

        A diffusers pipeline folder works too (its ``text_encoder/`` is used). ``overrides`` replace config fields,
        e.g. ``output_layer="penultimate"`` for a 24-layer OpenCLIP encoder stored whole. A ``pytorch_model.bin``
        without safetensors is read with ``torch.load(weights_only=True)``, which runs no code from the file.
        """
        folder = Path(path)
        if not (folder / "config.json").is_file() and (folder / "text_encoder" / "config.json").is_file():
            folder = folder / "text_encoder"
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{folder} is not a text encoder folder: it has no config.json")
        config = CLIPTextConfig.from_hf(json.loads(config_file.read_text(encoding="utf-8")), **overrides)
        if (folder / "model.safetensors").is_file():
            weights = load_file(str(folder / "model.safetensors"))
        elif (folder / "pytorch_model.bin").is_file():
            weights = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{folder} has no model.safetensors (or pytorch_model.bin)")
        model = cls(config)
        model.load_weights(weights)
        return model


# ---- OpenCLIP <-> Hugging Face names ----------------------------------------------------------------------------
#
# OpenCLIP (open_clip/model.py, transformer.py; SD v2 checkpoints under "cond_stage_model.model."):
#   token_embedding.weight, positional_embedding (a bare (L, D) parameter), ln_final.{weight,bias},
#   transformer.resblocks.N.{ln_1, attn.in_proj_weight (3D, D) / attn.in_proj_bias (3D,) packed q|k|v as in
#   nn.MultiheadAttention, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, plus text_projection (D, E) and
#   logit_scale, which only CLIP's contrastive head uses. diffusers' single_file_utils maps the same names.

_BLOCK_RENAMES = {  # OpenCLIP block suffix -> Hugging Face layer suffix (the packed q/k/v are handled apart)
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_PACKED = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_TOP_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPENCLIP_UNUSED = ("text_projection", "logit_scale", "logit_bias", "attn_mask")
_HF_UNUSED = ("text_projection.weight", "visual_projection.weight", "logit_scale", "text_model.embeddings.position_ids")
_HF_UNPREFIXED = ("embeddings.", "encoder.", "final_layer_norm.")
_OPENCLIP_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")


def is_openclip_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether the (prefix-free) keys are OpenCLIP's rather than Hugging Face's."""
    return "positional_embedding" in state_dict or any(_OPENCLIP_BLOCK.fullmatch(k) for k in state_dict)


def _drop_unused_hf_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face weights, normalised: ``text_model.`` prefixed, without parts the text encoder does not use.

    transformers 5 saves ``CLIPTextModel`` without the ``text_model.`` level (``embeddings.``, ``encoder.``,
    ``final_layer_norm.``); earlier versions, SD v1 checkpoints and published diffusers folders keep it. Both load.
    """
    state_dict = {("text_model." + k if k.startswith(_HF_UNPREFIXED) else k): v for k, v in state_dict.items()}
    dropped = [k for k in state_dict if k in _HF_UNUSED or k.startswith("vision_model.")]
    if dropped:
        logger.info("ignoring %d weights the text encoder does not use (%s)", len(dropped),
                    ", ".join(sorted(dropped)[:4]) + (" ..." if len(dropped) > 4 else ""))
    return {k: v for k, v in state_dict.items() if k not in dropped}


def openclip_to_hf(state_dict: dict[str, torch.Tensor], num_layers: int | None = None) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower weights (prefix already stripped) -> Hugging Face ``CLIPTextModel`` names.

    The packed ``attn.in_proj_*`` is split in three equal row blocks, q, k, v in that order. Blocks numbered
    ``num_layers`` and above are dropped: diffusers keeps 23 of SD v2's 24 (the last is never run in penultimate
    mode); None keeps all. The vision tower (``visual.*``), ``text_projection``, ``logit_scale`` (and ``logit_bias``)
    are not part of the text encoder and are dropped, logged; any other unknown key is an error. The returned
    tensors are fresh and contiguous (safe to save), and ``hf_to_openclip`` gives the inputs back bit for bit.
    """
    out: dict[str, torch.Tensor] = {}
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    unknown, unused = [], []
    for key, value in state_dict.items():
        match = _OPENCLIP_BLOCK.fullmatch(key)
        if match:
            blocks.setdefault(int(match.group(1)), {})[match.group(2)] = value
        elif key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value.clone()
        elif key in _OPENCLIP_UNUSED or key.startswith("visual."):
            unused.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"not OpenCLIP text-encoder weights, unknown keys: {', '.join(sorted(unknown)[:8])}"
                              + (f" ... ({len(unknown)} in all)" if len(unknown) > 8 else ""))
    missing = [k for k in _TOP_RENAMES if k not in state_dict]
    present = sorted(blocks)
    if present != list(range(len(present))):
        raise CheckpointError(f"OpenCLIP residual blocks are not numbered 0..N-1: {present}")
    if num_layers is None:
        num_layers = len(present)
    if num_layers > len(present):
        raise CheckpointError(f"the weights hold {len(present)} residual blocks, {num_layers} were asked for")
    for i in range(num_layers):
        block = blocks[i]
        missing += [f"transformer.resblocks.{i}.{name}" for name in [*_BLOCK_RENAMES, *_PACKED] if name not in block]
        extra = sorted(set(block) - set(_BLOCK_RENAMES) - set(_PACKED))
        if extra:
            raise CheckpointError(f"unknown keys in OpenCLIP block {i}: {', '.join(extra)}")
    if missing:
        raise CheckpointError(f"OpenCLIP text-encoder weights are incomplete, missing: {', '.join(missing[:8])}"
                              + (f" ... ({len(missing)} in all)" if len(missing) > 8 else ""))
    for i in range(num_layers):
        layer = f"text_model.encoder.layers.{i}."
        for name, value in blocks[i].items():
            if name in _PACKED:
                if value.shape[0] % 3:
                    raise CheckpointError(f"transformer.resblocks.{i}.{name} has {value.shape[0]} rows, not 3 x width")
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                    out[f"{layer}self_attn.{proj}.{_PACKED[name]}"] = part.clone()
            else:
                out[layer + _BLOCK_RENAMES[name]] = value.clone()
    if len(present) > num_layers:
        logger.info("OpenCLIP -> HF: dropped residual blocks %d..%d (keeping %d)", num_layers, len(present) - 1,
                    num_layers)
    if unused:
        logger.info("OpenCLIP -> HF: dropped %d keys the text encoder does not use (%s)", len(unused),
                    ", ".join(sorted(unused)[:4]) + (" ..." if len(unused) > 4 else ""))
    return out


def hf_to_openclip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``CLIPTextModel`` weights -> OpenCLIP's text-tower names (q/k/v packed into ``in_proj``).

    The inverse of ``openclip_to_hf`` on the text keys. ``text_projection`` and ``logit_scale`` cannot be
    recreated (the text encoder never had them); SD v2 loaders that want them (CompVis loads non-strictly) do
    without. The position-id buffer and unused CLIP parts are dropped as in ``CLIPTextModel.load_weights``.
    """
    state_dict = _drop_unused_hf_keys(state_dict)
    top = {hf: oc for oc, hf in _TOP_RENAMES.items()}
    block_names = {hf: oc for oc, hf in _BLOCK_RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    packed: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        match = _HF_LAYER.fullmatch(key)
        if key in top:
            out[top[key]] = value.clone()
        elif match and match.group(2) in block_names:
            out[f"transformer.resblocks.{match.group(1)}.{block_names[match.group(2)]}"] = value.clone()
        elif match and re.fullmatch(r"self_attn\.[qkv]_proj\.(weight|bias)", match.group(2)):
            proj, kind = match.group(2).split(".")[1:]
            packed.setdefault((int(match.group(1)), kind), {})[proj[0]] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"not Hugging Face CLIP text-encoder weights, unknown keys: "
                              f"{', '.join(sorted(unknown)[:8])}" + (" ..." if len(unknown) > 8 else ""))
    for (i, kind), parts in sorted(packed.items()):
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"layer {i}: self_attn {kind} needs q, k and v projections, got {sorted(parts)}")
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out
