"""The first-stage autoencoder of Latent Diffusion: Encoder, Decoder, and the KL / VQ model around them.

The layout and parameter names follow the CompVis / Stable Diffusion first stage, so the SD kl-f8 VAE
and the LDM VQ-f4/f8 models are configurations of these classes and their checkpoints load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.autoencoder.distributions import DiagonalGaussian
from latentdiff.autoencoder.quantize import VectorQuantizer
from latentdiff.config import check_ranges
from latentdiff.nn.layers import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample
from latentdiff.nn.onednn import Conv2d


@dataclass
class AutoencoderConfig:
    """Architecture and regulariser of a first-stage model (the CompVis ``ddconfig`` plus its wrapper)."""

    regularizer: str = "kl"  # "kl" (diagonal Gaussian posterior) or "vq" (vector quantiser)
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256  # nominal training resolution: attn_resolutions are counted from it
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    resamp_with_conv: bool = True
    z_channels: int = 4
    double_z: bool = True  # the encoder emits mean and log-variance (KL); False for VQ
    embed_dim: int = 4  # latent channels after quant_conv
    norm_groups: int = 32
    # vector quantiser (regularizer == "vq")
    n_embed: int = 8192
    beta: float = 0.25
    ema: bool = False
    ema_decay: float = 0.99
    restart_dead_codes: bool = True
    dead_code_threshold: float = 0.01
    restart_every: int = 50
    # A second decoder for inpainting that also sees the known pixels and the mask (MaskConditionedDecoder):
    # the kept region comes back as the input instead of as the latent code's reconstruction.
    mask_decoder: bool = False

    def __post_init__(self) -> None:
        if self.regularizer not in ("kl", "vq"):
            raise ValueError(f"regularizer must be 'kl' or 'vq', got {self.regularizer!r}")
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        check_ranges(self, positive=("in_channels", "out_ch", "resolution", "ch", "num_res_blocks", "z_channels",
                                     "embed_dim", "norm_groups", "n_embed", "restart_every"),
                     non_negative=("beta",), fractions=("dropout", "ema_decay", "dead_code_threshold"),
                     positive_items=("ch_mult",))
        if any(self.ch * mult % self.norm_groups for mult in self.ch_mult):
            raise ValueError(f"ch * ch_mult ({[self.ch * m for m in self.ch_mult]}) must be multiples of norm_groups "
                             f"({self.norm_groups}), the GroupNorm group count")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class Encoder(nn.Module):
    """conv_in -> per level: ResNet blocks (+attention) and a downsample -> middle -> norm, SiLU, conv_out."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], in_channels: int, resolution: int, z_channels: int,
                 double_z: bool = True, dropout: float = 0.0, resamp_with_conv: bool = True,
                 norm_groups: int = 32) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.conv_in = Conv2d(in_channels, ch, 3, padding=1)
        in_ch_mult = (1, *ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[level], ch * mult
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, dropout, num_groups=norm_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, norm_groups))
            if level != self.num_resolutions - 1:
                stage.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, num_groups=norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, num_groups=norm_groups)
        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != self.num_resolutions - 1:
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in -> middle -> per level (coarse to fine): ResNet blocks (+attention) and an upsample -> out."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], resolution: int, z_channels: int, dropout: float = 0.0,
                 resamp_with_conv: bool = True, norm_groups: int = 32, tanh_out: bool = False) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.tanh_out = tanh_out
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, num_groups=norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, num_groups=norm_groups)
        # Built coarse-to-fine but stored fine-to-coarse (``up.0`` is full resolution), as in the original.
        stages: list[nn.Module] = []
        for level in reversed(range(self.num_resolutions)):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, dropout, num_groups=norm_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, norm_groups))
            if level != 0:
                stage.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor, residuals: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``residuals``: optional features added after each level's blocks (``residuals[level]`` has that level's
        channels and resolution; MaskConditionedDecoder's)."""
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_resolutions)):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if residuals is not None:
                h = h + residuals[level]
            if level != 0:
                h = stage.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class MaskConditionedDecoder(nn.Module):
    """A decoder for inpainting that also sees the known pixels: an "asymmetric" first stage (Zhu et al. 2023,
    "Designing a Better Asymmetric VQGAN for StableDiffusion").

    A latent decoder can only return the kept region of an inpainted image as well as the latent code describes
    it: the autoencoder's reconstruction error, there and along the mask's edge. This one adds a small encoder of
    the masked image (the known pixels, zeros where the mask is 1) and the mask; its features at each resolution
    enter the decoder after that level's blocks through zero-initialised 1x1 convolutions, so before training it
    is exactly the plain decoder it was copied from. Trained with random masks on the reconstruction loss (the
    encoder and the plain decoder frozen: ``train_only: mask_decoder``), it learns to copy the known pixels and to
    blend the generated region into them. The latent space does not change, so every diffusion model trained on
    the first stage can use it.
    """

    def __init__(self, *, ch: int, out_ch: int, in_channels: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], resolution: int, z_channels: int, dropout: float = 0.0,
                 resamp_with_conv: bool = True, norm_groups: int = 32) -> None:
        super().__init__()
        self.decoder = Decoder(ch=ch, out_ch=out_ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                               attn_resolutions=attn_resolutions, resolution=resolution, z_channels=z_channels,
                               dropout=dropout, resamp_with_conv=resamp_with_conv, norm_groups=norm_groups)
        self.cond_in = Conv2d(in_channels + 1, ch, 3, padding=1)
        self.cond_down = nn.ModuleList()
        self.cond_out = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = ResnetBlock(block_in, ch * mult, dropout, num_groups=norm_groups)
            block_in = ch * mult
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(block_in, resamp_with_conv)
            self.cond_down.append(stage)
            out = Conv2d(block_in, block_in, 1)
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            self.cond_out.append(out)

    def forward(self, z: torch.Tensor, masked_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``z`` after post_quant_conv; ``masked_image`` in [-1, 1] with zeros where ``mask`` (N, 1, H, W) is 1."""
        h = self.cond_in(torch.cat([masked_image, mask], dim=1))
        residuals = []
        for level, stage in enumerate(self.cond_down):
            h = stage.block(h)
            residuals.append(self.cond_out[level](h))
            if level != len(self.cond_down) - 1:
                h = stage.downsample(h)
        return self.decoder(z, residuals)


@dataclass
class AutoencoderOutput:
    reconstruction: torch.Tensor
    latent: torch.Tensor  # what the diffusion model sees (before any scale factor)
    reg_loss: torch.Tensor  # KL per sample averaged over the batch (kl), or the VQ loss (vq)
    posterior: DiagonalGaussian | None = None
    indices: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class Autoencoder(nn.Module):
    """Encoder -> quant_conv -> regulariser (KL or VQ) -> post_quant_conv -> Decoder.

    ``encode`` returns the latent the diffusion model works in: a posterior (KL) or the quantised codes
    (VQ); ``decode`` maps a latent back to pixels in [-1, 1] (unclamped).
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = c = config
        if c.regularizer == "vq" and c.double_z:
            raise ValueError("a VQ autoencoder needs double_z: false (the encoder emits one latent)")
        arch = dict(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks, attn_resolutions=c.attn_resolutions,
                    resolution=c.resolution, z_channels=c.z_channels, dropout=c.dropout,
                    resamp_with_conv=c.resamp_with_conv, norm_groups=c.norm_groups)
        self.encoder = Encoder(in_channels=c.in_channels, double_z=c.double_z, **arch)
        self.decoder = Decoder(out_ch=c.out_ch, **arch)
        z_out = 2 * c.z_channels if c.double_z else c.z_channels
        if c.regularizer == "kl":
            self.quant_conv = Conv2d(z_out, 2 * c.embed_dim, 1)
        else:
            self.quant_conv = Conv2d(z_out, c.embed_dim, 1)
            self.quantize = VectorQuantizer(c.n_embed, c.embed_dim, beta=c.beta, ema=c.ema, ema_decay=c.ema_decay,
                                            restart_dead_codes=c.restart_dead_codes,
                                            dead_code_threshold=c.dead_code_threshold, restart_every=c.restart_every)
        self.post_quant_conv = Conv2d(c.embed_dim, c.z_channels, 1)
        if c.mask_decoder:
            self.mask_decoder = MaskConditionedDecoder(out_ch=c.out_ch, in_channels=c.in_channels, **arch)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's final weight, where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    def _check_input(self, x: torch.Tensor) -> None:
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images of shape (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {tuple(x.shape[2:])} is not divisible by the downsampling factor {f}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian | torch.Tensor:
        """The posterior q(z|x) for KL models; the quantised latent for VQ models."""
        self._check_input(x)
        h = self.quant_conv(self.encoder(x))
        if self.config.regularizer == "kl":
            return DiagonalGaussian(h)
        return self.quantize(h).quantized

    def encode_pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        """The continuous encoder output before quantisation (VQ) or the posterior parameters (KL)."""
        self._check_input(x)
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"expected latents of shape (N, {self.config.embed_dim}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def decode_masked(self, z: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decode with the mask-conditioned decoder (``mask_decoder: true``): ``image`` (N, C, H, W) in [-1, 1] is
        known where ``mask`` (N, 1, H, W) is 0 (1 = repainted); what the mask covers is not looked at."""
        if not self.config.mask_decoder:
            raise ValueError("this autoencoder has no mask-conditioned decoder (mask_decoder: false)")
        if z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"expected latents of shape (N, {self.config.embed_dim}, h, w), got {tuple(z.shape)}")
        f = self.downsample_factor
        size = (z.shape[0], z.shape[2] * f, z.shape[3] * f)
        if image.shape != (size[0], self.config.in_channels, *size[1:]) or mask.shape != (size[0], 1, *size[1:]):
            raise ValueError(f"latents {tuple(z.shape)} need images {(size[0], self.config.in_channels, *size[1:])} "
                             f"and masks {(size[0], 1, *size[1:])}; got {tuple(image.shape)} and {tuple(mask.shape)}")
        mask = mask.to(image.dtype)
        return self.mask_decoder(self.post_quant_conv(z), image * (1 - mask), mask)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode VQ code indices (N, h, w)."""
        if self.config.regularizer != "vq":
            raise ValueError("decode_indices needs a VQ autoencoder")
        return self.decode(self.quantize.lookup(indices))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None, mask: torch.Tensor | None = None) -> AutoencoderOutput:
        """Encode and decode ``x``; with ``mask`` (N, 1, H, W; 1 = unknown) through the mask-conditioned decoder,
        which sees ``x`` where the mask is 0 (how it is trained)."""
        h = self.encode_pre_quant(x)

        def decode(z: torch.Tensor) -> torch.Tensor:
            return self.decode(z) if mask is None else self.decode_masked(z, x, mask)

        if self.config.regularizer == "kl":
            posterior = DiagonalGaussian(h)
            z = posterior.sample(generator) if sample_posterior else posterior.mode()
            kl = posterior.kl().mean()
            return AutoencoderOutput(decode(z), z, kl, posterior=posterior, stats={"kl": kl.detach()})
        q = self.quantize(h)
        stats = {"perplexity": q.perplexity.detach(), "codebook_usage": q.usage.detach()}
        return AutoencoderOutput(decode(q.quantized), q.quantized, q.loss, indices=q.indices, stats=stats)
