"""A model's architecture when its file does not store our config: read from the tensor shapes.

Shapes give every width, depth and level of the UNet, the VAE and the CLIP text encoder. What they cannot tell,
the attention head count, follows the Stable Diffusion convention (see :func:`infer_unet_config`); the VAE's
training resolution and norm groups, and the text encoder's activation, follow SD's models likewise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from latentdiff.autoencoder.model import AutoencoderConfig
from latentdiff.diffusion.unet import UNetConfig
from latentdiff.formats.components import UNET_PREFIX, VAE_PREFIX
from latentdiff.io.errors import CheckpointError


def _strip(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` without it, or the whole dict when no key has the prefix."""
    if any(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def block_ids(state_dict: dict[str, torch.Tensor], prefix: str, position: int) -> list[int]:
    """The distinct integers at dotted ``position`` of the keys that start with ``prefix``."""
    ids = set()
    for key in state_dict:
        if key.startswith(prefix):
            part = key.split(".")[position]
            if part.isdigit():
                ids.add(int(part))
    return sorted(ids)


def _sd_heads(context_dim: int | None, linear: bool, widths: list[int], spatial: bool) -> dict[str, int]:
    """The attention heads the Stable Diffusion family uses, as the shapes cannot tell them.

    SD v1 (CLIP ViT-L context, 768) has 8 heads at every width; SD v2 (OpenCLIP ViT-H context, 1024) has 64-wide
    heads. Other models follow their projection type (linear: 64-wide, as SD v2 and SDXL; conv: 8 heads), and
    LDM's single-layer AttentionBlock models use 32-wide heads. A width that a head width does not divide falls
    back to a head count.
    """
    if not spatial:
        width = 32
    elif context_dim == 768:
        width = -1
    elif context_dim == 1024 or linear:
        width = 64
    else:
        width = -1
    if width != -1 and all(w % width == 0 for w in widths):
        return {"num_heads": -1, "num_head_channels": width}
    heads = 8 if all(w % 8 == 0 for w in widths) else 1
    return {"num_heads": heads, "num_head_channels": -1}


def _with_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """``config`` with ``overrides``; a head count given alone turns the head width off, and the other way round."""
    overrides = dict(overrides)
    if "num_heads" in overrides and "num_head_channels" not in overrides:
        overrides["num_head_channels"] = -1
    if "num_head_channels" in overrides and "num_heads" not in overrides:
        overrides["num_heads"] = -1
    return dataclasses.replace(config, **overrides)


def infer_unet_config(state_dict: dict[str, torch.Tensor], **overrides: Any) -> UNetConfig:
    """The ``UNetConfig`` of an original-layout UNet state dict (with or without ``model.diffusion_model.``).

    Read from the shapes: in/out channels, model_channels, channel_mult, num_res_blocks, attention_resolutions,
    transformer_depth, context_dim, conv vs linear transformer projections, scale-shift norm, class labels. The
    head count is not in the shapes; it follows the SD convention (context 768: 8 heads as SD v1; context 1024:
    64-wide heads as SD v2). Any field can be given in ``overrides`` instead (``num_heads=…`` alone implies
    ``num_head_channels=-1`` and vice versa). A cross-attention context as wide as every transformer it feeds is
    indistinguishable from self-attention only when all transformers have one width; it is then taken as a context.
    """
    sd = _strip(state_dict, UNET_PREFIX)
    try:
        first = sd["input_blocks.0.0.weight"]
        model_channels, in_channels = int(first.shape[0]), int(first.shape[1])
        out_channels = int(sd["out.2.weight"].shape[0])
        n_in = block_ids(sd, "input_blocks.", 1)[-1] + 1
        downs = [i for i in range(n_in) if f"input_blocks.{i}.0.op.weight" in sd]
        levels = len(downs) + 1
        res_blocks, rem = divmod(n_in - levels, levels)
        if rem or res_blocks < 1 or downs != [(level + 1) * (res_blocks + 1) for level in range(levels - 1)]:
            raise CheckpointError("the input blocks do not form levels closed by a strided conv ('op'); only "
                                  "conv-resampling UNets can be read without a config")
        channel_mult, attention_resolutions, widths = [], [], []
        for level in range(levels):
            block = 1 + level * (res_blocks + 1)
            width = int(sd[f"input_blocks.{block}.0.out_layers.3.weight"].shape[0])
            if width % model_channels:
                raise CheckpointError(f"level {level} is {width} wide, not a multiple of {model_channels}")
            channel_mult.append(width // model_channels)
            if any(k.startswith(f"input_blocks.{block}.1.") for k in sd):
                attention_resolutions.append(2 ** level)
                widths.append(width)
        widths.append(model_channels * channel_mult[-1])
        mid = "middle_block.1."
        spatial = f"{mid}proj_in.weight" in sd
        if not spatial and f"{mid}qkv.weight" not in sd:
            raise CheckpointError("the middle block has neither a transformer (proj_in) nor an attention block (qkv)")
        context_dim, linear, depth = None, False, 1
        if spatial:
            linear = sd[f"{mid}proj_in.weight"].ndim == 2
            depth = block_ids(sd, f"{mid}transformer_blocks.", 3)[-1] + 1
            pairs = {(int(v.shape[1]), int(sd[k.replace("to_k", "to_q")].shape[0]))
                     for k, v in sd.items() if k.endswith("transformer_blocks.0.attn2.to_k.weight")}
            key_dims = {k for k, _ in pairs}
            self_only = all(k == q for k, q in pairs) and len({q for _, q in pairs}) > 1
            if not self_only:
                if len(key_dims) != 1:
                    raise CheckpointError(f"the cross-attention layers read contexts of different widths {key_dims}")
                context_dim = key_dims.pop()
        emb = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
        scale_shift = emb == 2 * sd["input_blocks.1.0.out_layers.3.weight"].shape[0]
        if any(k.startswith("label_emb.0.") for k in sd):
            raise CheckpointError("this UNet has an SDXL-style vector embedding (label_emb.0.*), which our UNet lacks")
        num_classes = int(sd["label_emb.weight"].shape[0]) if "label_emb.weight" in sd else None
    except KeyError as e:
        raise CheckpointError(f"cannot read the UNet architecture from the weights: no key {e}") from None
    config = UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=res_blocks,
        attention_resolutions=tuple(sorted(attention_resolutions, reverse=True)),  # CompVis writes (4, 2, 1)
        transformer_depth=depth,
        context_dim=context_dim,
        use_spatial_transformer=spatial,
        use_linear_in_transformer=linear,
        use_scale_shift_norm=bool(scale_shift),
        num_classes=num_classes,
        legacy=False,
        **_sd_heads(context_dim, linear, widths, spatial),
    )
    return _with_overrides(config, overrides)


def infer_autoencoder_config(state_dict: dict[str, torch.Tensor], **overrides: Any) -> AutoencoderConfig:
    """The ``AutoencoderConfig`` of an original-layout KL VAE state dict (with or without ``first_stage_model.``).

    Read from the shapes: ch, ch_mult, num_res_blocks, z_channels, double_z, embed_dim, in/out channels, attention
    levels. ``resolution`` only places ``attn_resolutions`` and is taken as 256 (SD's training size); the group
    count of the norms is not in the shapes and is taken as 32.
    """
    sd = _strip(state_dict, VAE_PREFIX)
    if "quantize.embedding.weight" in sd:
        raise CheckpointError("this is a vector-quantised (VQ) first stage; the Stable Diffusion formats hold the "
                              "KL autoencoder (native VQ checkpoints load with load_autoencoder)")
    try:
        conv_in = sd["encoder.conv_in.weight"]
        ch, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
        levels = block_ids(sd, "encoder.down.", 2)[-1] + 1
        res_blocks = block_ids(sd, "encoder.down.0.block.", 4)[-1] + 1
        channel_mult = []
        for level in range(levels):
            width = int(sd[f"encoder.down.{level}.block.{res_blocks - 1}.conv2.weight"].shape[0])
            if width % ch:
                raise CheckpointError(f"encoder level {level} is {width} wide, not a multiple of {ch}")
            channel_mult.append(width // ch)
        resolution = int(overrides.get("resolution", 256))
        attn = tuple(resolution // 2 ** level for level in range(levels)
                     if any(k.startswith(f"encoder.down.{level}.attn.") for k in sd))
        z_channels = int(sd["decoder.conv_in.weight"].shape[1])
        double_z = int(sd["encoder.conv_out.weight"].shape[0]) == 2 * z_channels
        embed_dim = int(sd["post_quant_conv.weight"].shape[1])
        out_ch = int(sd["decoder.conv_out.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"cannot read the VAE architecture from the weights: no key {e}") from None
    config = AutoencoderConfig(regularizer="kl", in_channels=in_channels, out_ch=out_ch, resolution=resolution,
                               ch=ch, ch_mult=tuple(channel_mult), num_res_blocks=res_blocks, attn_resolutions=attn,
                               resamp_with_conv=levels == 1 or "encoder.down.0.downsample.conv.weight" in sd,
                               z_channels=z_channels, double_z=double_z, embed_dim=embed_dim)
    return dataclasses.replace(config, **overrides)


def infer_clip_text_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A Hugging Face ``CLIPTextConfig`` dict for a ``CLIPTextModel`` state dict.

    Shapes give the widths and depth; heads (64 wide) and the activation (quick_gelu for OpenAI's 768-wide
    ViT-L of SD v1, gelu for OpenCLIP's 1024-wide ViT-H of SD v2) follow the SD text encoders.
    """
    try:
        vocab, hidden = (int(n) for n in state_dict["text_model.embeddings.token_embedding.weight"].shape)
        positions = int(state_dict["text_model.embeddings.position_embedding.weight"].shape[0])
        intermediate = int(state_dict["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"cannot read the text encoder's architecture: no key {e}") from None
    layers = block_ids(state_dict, "text_model.encoder.layers.", 3)[-1] + 1
    projection = state_dict.get("text_projection.weight")
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64), "max_position_embeddings": positions,
        "hidden_act": "quick_gelu" if hidden == 768 else "gelu", "layer_norm_eps": 1e-5,
        "projection_dim": int(projection.shape[0]) if projection is not None else hidden,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,  # CLIP's tokenizer ids
    }
