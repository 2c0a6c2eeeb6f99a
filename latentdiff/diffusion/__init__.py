"""Latent diffusion: noise schedules, the forward/reverse process, objectives, denoisers and samplers."""
