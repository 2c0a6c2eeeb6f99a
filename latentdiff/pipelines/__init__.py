"""Pipelines: thin compositions of the models for each task (text-to-image, image-to-image, inpainting,
class map to image, super-resolution).

``load_pipeline(path)`` asks the format registry (``latentdiff.formats.detect_format``) what a checkpoint is, looks
at what it holds and returns the pipeline that runs it:

- a model trained here (a run folder, checkpoint folder or ``model.safetensors`` written by ``latentdiff train``):
  ``LatentDiffusionPipeline`` (``latentdiff.pipelines.native``), whatever its conditioning;
- Stable Diffusion (an original single file, a diffusers folder, or a native checkpoint written by
  ``latentdiff.formats.save_native``, whose config says ``stable_diffusion``): ``StableDiffusionPipeline``.

Any other model is refused with a line that says what it is. A new kind of model is one more ``_identify`` branch
and loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentdiff.formats import StableDiffusionComponents, detect_format, read_components
from latentdiff.io.checkpoint import read_native_config
from latentdiff.io.errors import CheckpointError
from latentdiff.pipelines.native import (
    LatentDiffusionOutput,
    LatentDiffusionPipeline,
    is_native_diffusion_config,
)
from latentdiff.pipelines.stable_diffusion import StableDiffusionOutput, StableDiffusionPipeline

Pipeline = StableDiffusionPipeline | LatentDiffusionPipeline


def _identify(comps: StableDiffusionComponents) -> str | None:
    """None when the components are a Stable Diffusion model the pipeline runs; else what they are instead."""
    if comps.unet is None:
        held = [name for name, part in (("a VAE", comps.vae), ("a text encoder", comps.text_encoder)) if part]
        return f"it holds only {' and '.join(held)}, no UNet" if held else "it holds no UNet"
    if comps.vae is None:
        return "it holds a UNet without its autoencoder (VAE)"
    unet, latent = comps.unet_config, comps.vae_config.embed_dim
    if unet.num_classes:
        return (f"it is a class-conditional latent diffusion model ({unet.num_classes} classes); sample it with "
                "`latentdiff sample`")
    if unet.out_channels != latent or unet.in_channels not in (latent, 2 * latent + 1):
        return (f"its UNet maps {unet.in_channels} to {unet.out_channels} channels over a {latent}-channel latent; "
                f"Stable Diffusion's maps {latent} (or {2 * latent + 1} for inpainting) to {latent}")
    if unet.context_dim and comps.text_encoder is None:
        return ("its UNet cross-attends to text but it has no CLIP text encoder (a bare UNet file, or a model "
                "trained with another text encoder)")
    return None


def load_pipeline(path: str | Path, **options: Any) -> Pipeline:
    """The pipeline for the checkpoint at ``path``; ``options`` go to its constructor (device, dtype, ...; for
    Stable Diffusion also ``loras=[(file, scale), ...]`` and ``embeddings=[file, ...]``).

    Raises ``CheckpointError`` naming the problem when the path is missing, unreadable or not a model a pipeline
    here runs (``ValueError`` for an option the model does not take).
    """
    config = options.pop("config", None)  # a single file's original YAML; a native checkpoint carries its own
    file_format = detect_format(path)
    if file_format == "native" and is_native_diffusion_config(read_native_config(path)):
        for option, what in (("loras", "LoRA files"), ("embeddings", "textual-inversion embeddings")):
            if options.pop(option, None):
                raise ValueError(f"{what} load into Stable Diffusion models; {path} is a model trained here")
        return LatentDiffusionPipeline.from_checkpoint(path, **options)
    comps = read_components(path, file_format, ema=options.pop("ema", True), config=config)
    problem = _identify(comps)
    if problem is not None:
        raise CheckpointError(f"{path} is not a Stable Diffusion model the pipelines run: {problem}")
    return StableDiffusionPipeline.from_components(comps, **options)


__all__ = ["LatentDiffusionOutput", "LatentDiffusionPipeline", "Pipeline", "StableDiffusionOutput",
           "StableDiffusionPipeline", "load_pipeline"]
