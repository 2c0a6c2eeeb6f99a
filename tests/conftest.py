"""Shared test settings and fixtures: deterministic, single-threaded torch keeps timings stable on shared CPUs."""

import pytest
import torch
from test_golden import _tiny_first_stage as save_tiny_autoencoder  # the golden runs' tiny first stage

from latentdiff.diffusion.unet import UNetConfig, UNetModel

torch.set_num_threads(1)


def small_unet(attention_resolutions: tuple[int, ...] = (2,)) -> UNetModel:
    """A seeded two-level UNet with transformers (cross-attention to 16-wide contexts) at ``attention_resolutions``,
    frozen, its zero-initialised output layers given small values so that every block contributes."""
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=attention_resolutions,
                     num_heads=2, context_dim=16)
    torch.manual_seed(0)
    model = UNetModel(cfg).eval().requires_grad_(False)
    for p in model.parameters():
        if not p.any():
            p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def make_small_unet():
    """``small_unet``, for tests that build their own."""
    return small_unet


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory):
    """A tiny random grey KL autoencoder (f = 2: 16 px images give 8x8x4 latents), as a checkpoint folder."""
    return save_tiny_autoencoder(tmp_path_factory.mktemp("ae"), 1)


@pytest.fixture(scope="module")
def scenes_first_stage(tmp_path_factory):
    """The same in RGB."""
    return save_tiny_autoencoder(tmp_path_factory.mktemp("ae_scenes"), 3)
