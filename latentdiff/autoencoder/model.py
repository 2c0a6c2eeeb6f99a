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
from latentdiff.nn.layers import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample


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

    def __post_init__(self) -> None:
        if self.regularizer not in ("kl", "vq"):
            raise ValueError(f"regularizer must be 'kl' or 'vq', got {self.regularizer!r}")
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)

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
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
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
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

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
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
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
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_resolutions)):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


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
            self.quant_conv = nn.Conv2d(z_out, 2 * c.embed_dim, 1)
        else:
            self.quant_conv = nn.Conv2d(z_out, c.embed_dim, 1)
            self.quantize = VectorQuantizer(c.n_embed, c.embed_dim, beta=c.beta, ema=c.ema, ema_decay=c.ema_decay,
                                            restart_dead_codes=c.restart_dead_codes,
                                            dead_code_threshold=c.dead_code_threshold, restart_every=c.restart_every)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)

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

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode VQ code indices (N, h, w)."""
        if self.config.regularizer != "vq":
            raise ValueError("decode_indices needs a VQ autoencoder")
        return self.decode(self.quantize.lookup(indices))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> AutoencoderOutput:
        h = self.encode_pre_quant(x)
        if self.config.regularizer == "kl":
            posterior = DiagonalGaussian(h)
            z = posterior.sample(generator) if sample_posterior else posterior.mode()
            kl = posterior.kl().mean()
            return AutoencoderOutput(self.decode(z), z, kl, posterior=posterior, stats={"kl": kl.detach()})
        q = self.quantize(h)
        stats = {"perplexity": q.perplexity.detach(), "codebook_usage": q.usage.detach()}
        return AutoencoderOutput(self.decode(q.quantized), q.quantized, q.loss, indices=q.indices, stats=stats)
