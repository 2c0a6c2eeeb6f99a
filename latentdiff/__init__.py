"""latentdiff: Latent Diffusion and Stable Diffusion in readable PyTorch."""

__version__ = "0.1.0"
