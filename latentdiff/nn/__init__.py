"""Building blocks shared by the autoencoder and the denoiser."""

from latentdiff.nn.attention import attention
from latentdiff.nn.embeddings import timestep_embedding
from latentdiff.nn.layers import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample
from latentdiff.nn.transformer import GEGLU, BasicTransformerBlock, CrossAttention, FeedForward, SpatialTransformer

__all__ = [
    "AttnBlock", "BasicTransformerBlock", "CrossAttention", "Downsample", "FeedForward", "GEGLU", "Normalize",
    "ResnetBlock", "SpatialTransformer", "Upsample", "attention", "timestep_embedding",
]
