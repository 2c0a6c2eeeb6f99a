"""Building blocks shared by the autoencoder and the denoiser."""

from latentdiff.nn.attention import attention
from latentdiff.nn.layers import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample

__all__ = ["AttnBlock", "Downsample", "Normalize", "ResnetBlock", "Upsample", "attention"]
