"""The denoising UNet of Latent Diffusion and Stable Diffusion (CompVis ``openaimodel.UNetModel``).

Given a noisy latent, its timestep and the conditioning (cross-attention context, class label, extra
concatenated channels), the network predicts the eps / x0 / v target of its training objective.

Module layout and parameter names are CompVis': ``time_embed``, ``label_emb``, ``input_blocks``,
``middle_block``, ``output_blocks``, ``out``. An original SD v1/v2 checkpoint loads into ``UNetModel``
after stripping the ``model.diffusion_model.`` prefix from its keys; ``UNetConfig.sd_v1()`` and
``UNetConfig.sd_v2()`` are the matching architectures.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from latentdiff.config import check_ranges
from latentdiff.nn.attention import attention
from latentdiff.nn.embeddings import timestep_embedding
from latentdiff.nn.onednn import Conv2d, Linear
from latentdiff.nn.transformer import SpatialTransformer


@dataclass
class UNetConfig:
    """Architecture of the denoiser; the field names and meanings are those of CompVis ``UNetModel``.

    The defaults are Stable Diffusion v1's UNet. Heads are set either by count (``num_heads``, with
    ``num_head_channels = -1``) or by width (``num_head_channels``, with ``num_heads = -1``); when both are
    given the width wins, as in CompVis. ``context_dim`` None or 0 means no cross-attention: the spatial
    transformer's second attention then attends to the image tokens themselves. ``in_channels`` counts any
    channels passed as ``concat`` to ``UNetModel.forward`` (9 for SD inpainting: 4 latent + 4 masked image
    latent + 1 mask).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors at which attention is used
    dropout: float = 0.0
    num_heads: int = 8
    num_head_channels: int = -1
    transformer_depth: int = 1
    context_dim: int | None = 768
    use_spatial_transformer: bool = True  # False: the older single-layer AttentionBlock (LDM's unconditional models)
    use_linear_in_transformer: bool = False  # SD v2: Linear instead of 1x1-conv proj_in / proj_out
    use_scale_shift_norm: bool = False  # FiLM: the timestep embedding scales and shifts the normalised features
    resblock_updown: bool = False  # resample inside ResBlocks instead of with Downsample / Upsample
    conv_resample: bool = True  # learned 3x3 conv when resampling, else average pooling / bare nearest upsampling
    num_classes: int | None = None  # class-conditional: label_emb(y) is added to the timestep embedding
    use_checkpoint: bool = False  # gradient checkpointing: recompute activations in backward to save memory
    legacy: bool = False  # CompVis' head-width rule for AttentionBlock; its constructor defaults to True

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        check_ranges(self, positive=("in_channels", "out_channels", "model_channels", "transformer_depth"),
                     fractions=("dropout",))
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels (the other one to -1)")
        if self.num_head_channels == -1 and self.num_heads < 1:
            raise ValueError(f"num_heads must be positive, got {self.num_heads}")
        if self.num_head_channels != -1 and self.num_head_channels < 1:
            raise ValueError(f"num_head_channels must be positive or -1, got {self.num_head_channels}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be at least 1, got {self.num_res_blocks}")
        for mult in self.channel_mult:
            if (self.model_channels * mult) % 32:
                raise ValueError(f"model_channels * channel_mult = {self.model_channels * mult} is not a multiple "
                                 "of 32, the UNet's GroupNorm group count")
        if self.context_dim and not self.use_spatial_transformer:
            raise ValueError("cross-attention (context_dim) needs use_spatial_transformer=True")
        if self.num_classes is not None and self.num_classes < 0:
            raise ValueError(f"num_classes must be None, 0 or positive, got {self.num_classes}")

    @property
    def downsample_factor(self) -> int:
        """How much smaller the deepest feature map is than the input: inputs must be multiples of it."""
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def sd_v1(cls, **overrides: object) -> UNetConfig:
        """Stable Diffusion v1.x (859,520,964 parameters): 8 heads, CLIP ViT-L/14 context (768), conv projections.

        ``UNetConfig.sd_v1(in_channels=9)`` is the SD v1.5 inpainting UNet.
        """
        base = cls(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                   attention_resolutions=(4, 2, 1), num_heads=8, num_head_channels=-1, transformer_depth=1,
                   context_dim=768, use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def sd_v2(cls, **overrides: object) -> UNetConfig:
        """Stable Diffusion v2.x (865,910,724 parameters): 64-wide heads, OpenCLIP ViT-H context (1024), linear
        projections. The 512 (eps) and 768-v (v-prediction) models share this architecture;
        ``UNetConfig.sd_v2(in_channels=9)`` is the SD 2 inpainting UNet.
        """
        base = cls(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                   attention_resolutions=(4, 2, 1), num_heads=-1, num_head_channels=64, transformer_depth=1,
                   context_dim=1024, use_spatial_transformer=True, use_linear_in_transformer=True, legacy=False)
        return dataclasses.replace(base, **overrides)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that computes in float32 and returns the input dtype, so half-precision runs stay stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's normalisation: 32 groups, PyTorch's default eps (1e-5), affine."""
    return GroupNorm32(32, channels)


def _zero_(module: nn.Module) -> nn.Module:
    # Layers that end a residual branch start at zero so that a new block, and a new UNet, is the identity
    # (the whole UNet then predicts exactly zero), as in the original.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepBlock(nn.Module):
    """Marker base class: a layer whose forward takes the timestep embedding as its second argument."""


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands each layer what it needs: the embedding to ResBlocks, the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (symmetric padding 1), or 2x2 average pooling.

    Unlike the first stage's ``latentdiff.nn.Downsample`` (right/bottom padding, ``conv``), the UNet pads
    all sides and names the layer ``op``.
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise ValueError("average-pool downsampling cannot change the channel count")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution with nearest-neighbour interpolation, then an optional 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = Conv2d(channels, out_channels, 3, padding=1)
        elif out_channels != channels:
            raise ValueError("upsampling without a conv cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling (``up``/``down``).

    in_layers: GroupNorm32, SiLU, 3x3 conv. The embedding, through ``emb_layers`` (SiLU, Linear), is either
    added to the features or, with ``use_scale_shift_norm``, scales and shifts them right after the first
    out_layers norm. out_layers: GroupNorm32, SiLU, Dropout, zero-initialised 3x3 conv. The skip path is a
    1x1 conv when the channel count changes.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.channels, self.out_channels = channels, out_channels
        self.use_scale_shift_norm, self.use_checkpoint = use_scale_shift_norm, use_checkpoint
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        _zero_(Conv2d(out_channels, out_channels, 3, padding=1)))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # Resample between the activation and the conv, so the conv runs at the new resolution.
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over pixels with a fused 1-D qkv conv (used when there is no transformer).

    The qkv channels are laid out head by head, each head holding its q, k and v (CompVis'
    ``QKVAttentionLegacy`` order), which is how LDM's checkpoints store them.
    """

    def __init__(self, channels: int, num_heads: int = 1, use_checkpoint: bool = False) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} attention heads")
        self.channels, self.num_heads, self.use_checkpoint = channels, num_heads, use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero_(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        length, heads = x.shape[-1], self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(b, heads, 3, c // heads, length)
        # (B, heads, head_dim, T) -> (B, T, heads * head_dim), the token layout ``attention`` takes.
        q, k, v = (qkv[:, :, i].permute(0, 3, 1, 2).reshape(b, length, c) for i in range(3))
        h = attention(q, k, v, heads).transpose(1, 2)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The CompVis UNet: timestep (+ class) embedding, an encoder of ResBlocks with attention, a middle
    block, and a decoder that concatenates the encoder's features at each step."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        mc = cfg.model_channels
        time_embed_dim = 4 * mc
        context_dim = cfg.context_dim or None

        def res_block(ch: int, out_ch: int, **kwargs: bool) -> ResBlock:
            return ResBlock(ch, time_embed_dim, cfg.dropout, out_ch, cfg.use_scale_shift_norm,
                            use_checkpoint=cfg.use_checkpoint, **kwargs)

        def attention_block(ch: int) -> nn.Module:
            heads, dim_head = self._attention_heads(ch)
            if cfg.use_spatial_transformer:
                return SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, context_dim=context_dim,
                                          use_linear=cfg.use_linear_in_transformer, use_checkpoint=cfg.use_checkpoint)
            return AttentionBlock(ch, heads, use_checkpoint=cfg.use_checkpoint)

        self.time_embed = nn.Sequential(Linear(mc, time_embed_dim), nn.SiLU(),
                                        Linear(time_embed_dim, time_embed_dim))
        if cfg.num_classes:
            self.label_emb = nn.Embedding(cfg.num_classes, time_embed_dim)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]  # channels of every input block's output, consumed in reverse by the decoder
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attention_block(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = res_block(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, cfg.conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        # CompVis puts attention in the middle whatever attention_resolutions says.
        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attention_block(ch), res_block(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attention_block(ch))
                if level and i == cfg.num_res_blocks:
                    up = res_block(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, cfg.conv_resample)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        # ch == model_channels * channel_mult[0]; CompVis writes model_channels, which is the same for every
        # published config (channel_mult[0] == 1) but breaks for any other first multiplier.
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), _zero_(Conv2d(ch, cfg.out_channels, 3, padding=1)))

    def _attention_heads(self, ch: int) -> tuple[int, int]:
        """(heads, head width) of an attention layer on ``ch`` channels, by CompVis' rules."""
        cfg = self.config
        if cfg.num_head_channels == -1:
            heads, dim_head = cfg.num_heads, ch // cfg.num_heads
        else:
            heads, dim_head = ch // cfg.num_head_channels, cfg.num_head_channels
        if heads < 1 or dim_head < 1:
            raise ValueError(f"cannot form attention heads on {ch} channels with num_heads={cfg.num_heads}, "
                             f"num_head_channels={cfg.num_head_channels}")
        if cfg.use_spatial_transformer:
            return heads, dim_head  # legacy gives the same width here: ch // heads
        # AttentionBlock takes a head width (when given one) and derives the count from it. In legacy mode
        # that width is the raw num_head_channels, so num_heads is used as is when only it is set.
        width = cfg.num_head_channels if cfg.legacy else dim_head
        if width == -1:
            return heads, dim_head
        if ch % width:
            raise ValueError(f"{ch} channels are not divisible by the attention head width {width}")
        return ch // width, width

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Turn gradient checkpointing of every ResBlock, AttentionBlock and transformer block on or off."""
        self.config = dataclasses.replace(self.config, use_checkpoint=enabled)
        for module in self.modules():
            if hasattr(module, "use_checkpoint"):
                module.use_checkpoint = enabled

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                concat: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the network target for a noisy batch.

        x: (N, C, H, W), H and W multiples of ``config.downsample_factor``. timesteps: (N,) int or float, or
        one value for the whole batch. context: (N, L, context_dim) cross-attention tokens. y: (N,) class
        labels when ``num_classes`` is set. context_mask: (N, L) bool, True for tokens to attend to.
        concat: (N, Cc, H, W) extra input channels appended to x (inpainting masks, low-res images, maps);
        C + Cc must equal ``in_channels``. Returns (N, out_channels, H, W).
        """
        x = self._prepare_inputs(x, context, y, context_mask, concat)
        timesteps = self._batch_timesteps(timesteps, x)
        emb_dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(emb_dtype))
        if self.config.num_classes:
            emb = emb + self.label_emb(y)

        # Inside ``deep_cache`` a cached step runs only the outermost ``shallow`` blocks of each side, on the deep
        # feature kept from the last full step; otherwise (shallow 0 without the cache) the whole network runs.
        cache = self.__dict__.get("_deep_cache")
        slot = cache.begin(timesteps) if cache is not None else 0
        kept = cache.reuse(slot, x) if cache is not None else None
        shallow = cache.branch + 1 if cache is not None else 0
        skips = []
        h = x
        for block in self.input_blocks if kept is None else self.input_blocks[:shallow]:
            h = block(h, emb, context, context_mask)
            skips.append(h)
        if kept is None:
            h = self.middle_block(h, emb, context, context_mask)
            for block in self.output_blocks[:len(self.output_blocks) - shallow]:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
            if cache is not None:
                cache.keep(slot, x, h)
        else:
            h = kept
        for block in self.output_blocks[len(self.output_blocks) - shallow:]:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)

    @staticmethod
    def _batch_timesteps(timesteps: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor(timesteps, device=x.device)
        timesteps = timesteps.to(x.device)
        if timesteps.ndim == 0 or timesteps.shape == (1,):
            return timesteps.reshape(1).expand(n)
        if timesteps.shape != (n,):
            raise ValueError(f"timesteps must be one value or shape ({n},) for a batch of {n}, "
                             f"got shape {tuple(timesteps.shape)}")
        return timesteps

    def _prepare_inputs(self, x: torch.Tensor, context: torch.Tensor | None, y: torch.Tensor | None,
                        context_mask: torch.Tensor | None, concat: torch.Tensor | None) -> torch.Tensor:
        """Check every input against the config (clear errors instead of shape mismatches deep inside) and
        return x with the concat channels appended."""
        cfg = self.config
        if x.ndim != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
        n, c, height, width = x.shape
        if concat is not None:
            if concat.ndim != 4 or concat.shape[0] != n or concat.shape[2:] != x.shape[2:]:
                raise ValueError(f"concat must be (N, C, H, W) = ({n}, *, {height}, {width}), "
                                 f"got shape {tuple(concat.shape)}")
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        if x.shape[1] != cfg.in_channels:
            extra = f" + {x.shape[1] - c} concat" if concat is not None else ""
            raise ValueError(f"the UNet takes {cfg.in_channels} input channels, got {c}{extra}")
        f = cfg.downsample_factor
        if height % f or width % f:
            raise ValueError(f"spatial size {height}x{width} must be divisible by {f} "
                             f"(2 ** (len(channel_mult) - 1))")
        if cfg.context_dim:
            if context is None:
                raise ValueError(f"this UNet cross-attends to a context: pass context of shape "
                                 f"(N, tokens, {cfg.context_dim})")
            if context.ndim != 3 or context.shape[0] != n or context.shape[2] != cfg.context_dim:
                raise ValueError(f"context must be (N, tokens, context_dim) = ({n}, L, {cfg.context_dim}), "
                                 f"got shape {tuple(context.shape)}")
        elif context is not None:
            raise ValueError("this UNet has no cross-attention (context_dim is unset) but a context was given")
        if context_mask is not None:
            if context is None:
                raise ValueError("context_mask was given without a context")
            if context_mask.shape != context.shape[:2]:
                raise ValueError(f"context_mask must be (N, tokens) = {tuple(context.shape[:2])}, "
                                 f"got shape {tuple(context_mask.shape)}")
        if cfg.num_classes:
            if y is None:
                raise ValueError(f"this UNet is class-conditional ({cfg.num_classes} classes): pass y, shape (N,)")
            if y.shape != (n,):
                raise ValueError(f"y must be (N,) = ({n},) class indices, got shape {tuple(y.shape)}")
        elif y is not None:
            raise ValueError("this UNet is not class-conditional (num_classes is unset) but y was given")
        return x


def unet_parameter_count(config: UNetConfig) -> int:
    """Number of parameters of a UNet with ``config``, counted without allocating its weights."""
    with torch.device("meta"):
        model = UNetModel(config)
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "AttentionBlock", "Downsample", "GroupNorm32", "ResBlock", "TimestepBlock", "TimestepEmbedSequential",
    "UNetConfig", "UNetModel", "Upsample", "normalization", "unet_parameter_count",
]
