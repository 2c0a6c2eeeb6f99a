"""Shared test settings: deterministic, single-threaded torch keeps timings stable on shared CPUs."""

import torch

torch.set_num_threads(1)
