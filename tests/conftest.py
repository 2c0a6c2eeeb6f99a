"""Shared test settings and fixtures: deterministic, single-threaded torch keeps timings stable on shared CPUs."""

import pytest
import torch
from test_golden import _tiny_first_stage as save_tiny_autoencoder  # the golden runs' tiny first stage

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory):
    """A tiny random grey KL autoencoder (f = 2: 16 px images give 8x8x4 latents), as a checkpoint folder."""
    return save_tiny_autoencoder(tmp_path_factory.mktemp("ae"), 1)


@pytest.fixture(scope="module")
def scenes_first_stage(tmp_path_factory):
    """The same in RGB."""
    return save_tiny_autoencoder(tmp_path_factory.mktemp("ae_scenes"), 3)
