"""A Stable Diffusion checkpoint converted to our native format is a ``LatentDiffusion`` that samples what the
Stable Diffusion pipeline samples from the original file.

Tiny SD-shaped models with seeded random weights (the shapes of ``tests/test_sd_pipeline.py``: UNet 32 channels,
VAE f2, CLIP text encoder 32 wide with the real CLIP tokenizer) are written as original single files, converted
with ``convert(..., "native")`` and loaded with ``load_latent_diffusion``; their conditioner is the frozen CLIP
(``text_encoder: clip``), plus the inpainting inputs for a 9-channel UNet.

Timestep conventions: ``LatentDiffusion.sample`` defaults to "trailing" spacing, the SD pipeline (as diffusers with
SD's scheduler config) uses "leading" spacing with ``steps_offset`` 1, and its DDIM/PLMS stop at alphas_cumprod[0]
while DPM-Solver++ divides T into ``steps + 1`` parts. Euler with ``spacing="leading"`` visits exactly the pipeline's
levels; for the others the test passes the pipeline's own sigmas (``pipe.sigmas(sampler, steps)``) to
``sample(sigmas=...)``. With the same levels, seed, prompt and negative prompt the images agree within 1e-6 (asserted:
1e-5). What is left is not the sampler: ``LatentDiffusion``'s denoiser feeds the UNet the fractional timestep it
computes back from each sigma (e.g. 900.99998), the pipeline the rounded one; with rounding both are bit-identical
(``test_rounded_timesteps_make_the_two_bit_identical``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
from latentdiff.conditioning.clip import CLIPTextConfig, CLIPTextModel
from latentdiff.conditioning.conditioner import CLIPEncoderConfig, Conditioner, ConditionerConfig
from latentdiff.conditioning.embedders.inpaint import InpaintConfig
from latentdiff.conditioning.tokenizer import default_vocab_path
from latentdiff.config import from_dict, to_dict
from latentdiff.diffusion.denoiser import DiscreteDenoiser
from latentdiff.diffusion.model import LatentDiffusion, LatentDiffusionConfig
from latentdiff.diffusion.unet import UNetConfig, UNetModel
from latentdiff.formats import (
    StableDiffusionComponents,
    convert,
    load_latent_diffusion,
    load_stable_diffusion_weights,
    save_native,
    save_original,
)
from latentdiff.formats.components import POSITION_IDS
from latentdiff.formats.stable_diffusion import IGNORED_KEYS
from latentdiff.io.checkpoint import read_checkpoint
from latentdiff.io.errors import CheckpointError
from latentdiff.pipelines import StableDiffusionPipeline, load_pipeline

try:
    default_vocab_path()
except FileNotFoundError:
    pytest.skip("the CLIP vocabulary (inside open_clip_torch) is not installed", allow_module_level=True)

TOL = 1e-5  # max |ours - pipeline| per pixel in [0, 1]
STEPS = 10
SIZE = 32
PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"
UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(2, 1), num_heads=2, num_head_channels=-1, context_dim=32)
UNET_V2 = dataclasses.replace(UNET, use_linear_in_transformer=True, num_heads=-1, num_head_channels=16)
VAE = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, resolution=32)
CLIP_V1 = CLIPTextConfig(width=32, layers=2, heads=2, mlp_width=64, activation="quick_gelu")
CLIP_V2 = CLIPTextConfig(width=32, layers=3, heads=2, mlp_width=64, activation="gelu", output_layer="penultimate")


def perturbed_state(module: torch.nn.Module, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """The module's weights plus seeded noise, so that no layer keeps a zero init."""
    g = torch.Generator().manual_seed(seed)
    return {k: v.detach() + scale * torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}


def components(unet_config: UNetConfig, seed: int, v2: bool = False) -> StableDiffusionComponents:
    """SD v1 style (quick-GELU CLIP, last layer, pad 49407, eps) or v2 style (GELU, penultimate of 3 layers,
    OpenCLIP layout in the file, pad 0, v-prediction)."""
    torch.manual_seed(seed)
    clip = CLIP_V2 if v2 else CLIP_V1
    hf = dict(clip.to_hf(), architectures=["CLIPTextModel"], model_type="clip_text_model")
    return StableDiffusionComponents(
        unet=perturbed_state(UNetModel(unet_config), seed + 1), unet_config=unet_config,
        vae=perturbed_state(Autoencoder(VAE), seed + 2), vae_config=VAE,
        text_encoder=perturbed_state(CLIPTextModel(clip), seed + 3), text_encoder_config=hf,
        text_encoder_layout="openclip" if v2 else "hf", text_encoder_output_layer=clip.output_layer,
        prediction_type="v_prediction" if v2 else "epsilon", image_size=SIZE)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd_native")
    out = {}
    for name, comps in (("v1", components(UNET, 0)), ("v2", components(UNET_V2, 20, v2=True)),
                        ("inpaint", components(dataclasses.replace(UNET, in_channels=9), 10))):
        out[name] = save_original(comps, root / f"{name}.safetensors")
        convert(out[name], root / f"{name}_run", "native")
        out[f"{name}_native"] = root / f"{name}_run"
    return out


@pytest.fixture(scope="module")
def v1(files) -> tuple[LatentDiffusion, StableDiffusionPipeline]:
    return load_latent_diffusion(files["v1_native"]), StableDiffusionPipeline.from_pretrained(files["v1"])


def images(ldm: LatentDiffusion, latents: torch.Tensor) -> torch.Tensor:
    """Our samples as the pipeline returns them: images in [0, 1]."""
    return (ldm.decode(latents).clamp(-1, 1) / 2 + 0.5).clamp(0, 1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


def levels(pipe: StableDiffusionPipeline, sampler: str) -> dict:
    """The pipeline's noise levels: Euler's equal our "leading" spacing; DDIM's and DPM-Solver++'s are passed."""
    return {"spacing": "leading"} if sampler == "euler" else {"sigmas": pipe.sigmas(sampler, STEPS, spacing="leading")}


# ------------------------------------------------------------------------------------------ the checkpoint


def test_native_sd_checkpoint_is_the_original_layout(files, tmp_path: Path) -> None:
    """Same tensors under the same names as the original file (CLIP under cond_stage_model.transformer.), and a
    config that load_latent_diffusion accepts: crossattn over a frozen CLIP conditioner."""
    original = load_file(str(files["v1"]))
    weights, config = read_checkpoint(files["v1_native"])
    expected = {k: v for k, v in original.items() if k not in IGNORED_KEYS and not k.endswith(POSITION_IDS)}
    assert sorted(weights) == sorted(expected)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.1.") for k in weights)
    model = config["model"]
    assert model["conditioning"] == "crossattn" and model["image_size"] == SIZE
    conditioner = from_dict(ConditionerConfig, model["conditioner"])
    assert conditioner.text_encoder == "clip" and conditioner.image == "none"
    assert conditioner.dropout_rate("caption") == 0.1
    assert conditioner.clip == CLIPEncoderConfig(model=CLIP_V1, pad_token_id=49407)
    ldm = load_latent_diffusion(files["v1_native"])
    assert ldm.config.unet == UNET and ldm.scale_factor == pytest.approx(0.18215)
    assert ldm.config.loss.parameterization == "eps" and ldm.config.schedule.kind == "scaled_linear"
    state = ldm.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    # And back: native -> original gives the original file's tensors again.
    back = load_file(str(convert(files["v1_native"], tmp_path / "again.safetensors", "original")))
    assert sorted(back) == sorted(expected) and all(torch.equal(back[k], expected[k]) for k in expected)


def test_file_without_our_metadata_converts_with_inferred_configs(files, tmp_path: Path) -> None:
    """A real SD file carries no configs: they are read from the shapes, the image size is SD's 512, the padding
    SD v1's end token."""
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(files["v1"])), str(bare))
    convert(bare, tmp_path / "run", "native")
    ldm = load_latent_diffusion(tmp_path / "run")
    clip = ldm.config.conditioner.clip
    assert ldm.config.image_size == 512 and clip.pad_token_id == 49407 and clip.model.output_layer == "last"
    assert (clip.model.width, clip.model.layers, clip.model.context_length) == (32, 2, 77)
    assert ldm.latent_shape == (4, 256, 256)


def test_v2_style_keeps_penultimate_layer_padding_and_v_prediction(files) -> None:
    ldm = load_latent_diffusion(files["v2_native"])
    clip = ldm.config.conditioner.clip
    assert clip.model == CLIP_V2 and clip.pad_token_id == 0
    assert ldm.config.loss.parameterization == "v"
    # The whole 3-layer tower is kept, in Hugging Face names (the original file has it in OpenCLIP's layout).
    assert "cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc1.weight" in ldm.state_dict()
    pipe = StableDiffusionPipeline.from_pretrained(files["v2"])
    theirs = pipe.text_to_image(PROMPT, NEGATIVE, steps=STEPS, sampler="ddim", generator=4)
    ours = ldm.sample(1, "ddim", generator=torch.Generator().manual_seed(4), cond={"caption": PROMPT},
                      uncond={"caption": NEGATIVE}, guidance_scale=7.5, decode=False, **levels(pipe, "ddim"))
    assert max_diff(images(ldm, ours), theirs.images) <= TOL


def test_unet_without_text_encoder_is_refused(files, tmp_path: Path) -> None:
    comps = load_stable_diffusion_weights(files["v1"], text_encoder=False)
    with pytest.raises(CheckpointError, match="no text encoder"):
        save_native(comps, tmp_path / "run")


# ------------------------------------------------------------------------------------------ sampling parity


@pytest.mark.parametrize(("sampler", "guidance"), [("euler", 7.5), ("ddim", 7.5), ("dpmpp_2m", 7.5), ("ddim", 1.0)])
def test_native_model_samples_what_the_pipeline_does(v1, sampler: str, guidance: float) -> None:
    ldm, pipe = v1
    theirs = pipe.text_to_image(PROMPT, NEGATIVE, steps=STEPS, sampler=sampler, generator=3,
                                guidance_scale=guidance, spacing="leading")
    ours = ldm.sample(1, sampler, steps=STEPS, generator=torch.Generator().manual_seed(3), cond={"caption": PROMPT},
                      uncond={"caption": NEGATIVE} if guidance != 1 else None, guidance_scale=guidance,
                      decode=False, **levels(pipe, sampler))
    assert max_diff(ours, theirs.latents) <= 1e-6 * float(theirs.latents.abs().max())
    assert max_diff(images(ldm, ours), theirs.images) <= TOL
    assert float(theirs.images.std()) > 0.05  # not a flat image


def test_default_negative_is_the_empty_caption_and_batches_broadcast(v1) -> None:
    ldm, pipe = v1
    theirs = pipe.text_to_image(PROMPT, num_images=2, steps=4, sampler="euler", generator=5, spacing="leading")
    ours = ldm.sample(2, "euler", steps=4, generator=torch.Generator().manual_seed(5), cond={"caption": PROMPT},
                      guidance_scale=7.5, spacing="leading")
    assert max_diff((ours / 2 + 0.5).clamp(0, 1), theirs.images) <= TOL


def test_default_trailing_spacing_is_another_schedule(v1) -> None:
    """Without the pipeline's levels the samples differ: the conventions are really different, and the
    tolerance tells them apart."""
    ldm, pipe = v1
    theirs = pipe.text_to_image(PROMPT, steps=STEPS, sampler="euler", generator=3)
    ours = ldm.sample(1, "euler", steps=STEPS, generator=torch.Generator().manual_seed(3), cond={"caption": PROMPT},
                      guidance_scale=7.5)
    assert max_diff((ours / 2 + 0.5).clamp(0, 1), theirs.images) > 100 * TOL


def test_rounded_timesteps_make_the_two_bit_identical(v1, monkeypatch) -> None:
    ldm, pipe = v1
    monkeypatch.setattr(ldm, "denoiser", lambda: DiscreteDenoiser(ldm.model, ldm.schedule, "eps", discrete_t=True))
    theirs = pipe.text_to_image(PROMPT, NEGATIVE, steps=STEPS, sampler="ddim", generator=6)
    ours = ldm.sample(1, "ddim", generator=torch.Generator().manual_seed(6), cond={"caption": PROMPT},
                      uncond={"caption": NEGATIVE}, guidance_scale=7.5, decode=False, **levels(pipe, "ddim"))
    assert torch.equal(ours, theirs.latents)


def test_native_inpainting_model_samples_what_the_pipeline_does(files) -> None:
    """The 9-channel UNet: conditioning "hybrid" (CLIP text + image: inpaint). The conditioner encodes the masked
    image to its posterior mean, the pipeline with ``sample_posterior=False`` too; the mask's box lies on whole
    latent cells, where max-pooling and nearest resizing agree."""
    ldm = load_latent_diffusion(files["inpaint_native"])
    assert ldm.config.conditioning == "hybrid" and ldm.config.conditioner.image == "inpaint"
    assert ldm.config.unet.in_channels == 9 and ldm.config.conditioner.image_dropout == 0
    pipe = StableDiffusionPipeline.from_pretrained(files["inpaint"])
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, SIZE, SIZE, generator=g)
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 8:22, 10:26] = 1
    theirs = pipe.inpaint(pixels, mask, PROMPT, NEGATIVE, steps=STEPS, sampler="ddim", generator=7,
                          sample_posterior=False)
    ours = ldm.sample(1, "ddim", generator=torch.Generator().manual_seed(7), guidance_scale=7.5, decode=False,
                      cond={"caption": PROMPT, "image": pixels * 2 - 1, "mask": mask}, uncond={"caption": NEGATIVE},
                      **levels(pipe, "ddim"))
    assert max_diff(images(ldm, ours), theirs.images) <= TOL


def test_load_pipeline_reads_the_native_checkpoint(files, v1) -> None:
    _, pipe = v1
    native = load_pipeline(files["v1_native"])
    assert native.tokenizer.pad_token_id == 49407 and native.text_encoder.config == CLIP_V1
    expected = pipe.text_to_image(PROMPT, NEGATIVE, steps=4, sampler="dpmpp_2m", generator=8).images
    assert torch.equal(native.text_to_image(PROMPT, NEGATIVE, steps=4, sampler="dpmpp_2m", generator=8).images,
                       expected)
    v2 = load_pipeline(files["v2_native"])
    assert v2.tokenizer.pad_token_id == 0 and v2.text_encoder.config == CLIP_V2
    assert v2.prediction_type == "v_prediction"


# ------------------------------------------------------------------------------------------ the conditioner


def test_clip_conditioner_is_frozen_saved_and_unmasked() -> None:
    config = ConditionerConfig(text_encoder="clip", clip=CLIPEncoderConfig(model=CLIP_V1))
    assert from_dict(ConditionerConfig, json.loads(json.dumps(to_dict(config)))) == config
    assert config.context_dim == 32 and config.cache_signature()["clip"]["max_length"] == 77
    conditioner = Conditioner(config, SIZE, 3, 4, SIZE // 2)
    conditioner.train()
    assert not conditioner.transformer.training
    assert not any(p.requires_grad for p in conditioner.parameters())
    assert all(k.startswith("transformer.text_model.") for k in conditioner.state_dict())
    cond = conditioner(conditioner.prepare({"caption": [PROMPT, ""]}))
    assert set(cond) == {"context"} and cond["context"].shape == (2, 77, 32)
    text = conditioner.embedder("caption")
    ids = text.tokenize([PROMPT])
    assert int(ids[0, -1]) == 49407 and torch.equal(text.empty_ids[0, :2], torch.tensor([49406, 49407]))
    torch.testing.assert_close(cond["context"][:1], conditioner.transformer.encode(ids), rtol=0, atol=0)
    first_stage = Autoencoder(VAE)
    model = LatentDiffusion(LatentDiffusionConfig(first_stage_config=VAE, scale_factor=0.18215, image_size=SIZE,
                                                  unet=dataclasses.replace(UNET, context_dim=None),
                                                  conditioning="crossattn", conditioner=config), first_stage)
    assert model.config.unet.context_dim == 32
    assert not {id(p) for p in model.trainable_parameters()} & {id(p) for p in model.cond_stage_model.parameters()}
    # The 9-channel inpainting UNet fits the channel checks with image: inpaint.
    inpaint = ConditionerConfig([*config.embedders, InpaintConfig(dropout=0.0)])
    LatentDiffusion(LatentDiffusionConfig(first_stage_config=VAE, scale_factor=0.18215, image_size=SIZE,
                                          unet=dataclasses.replace(UNET, in_channels=9), conditioning="hybrid",
                                          conditioner=inpaint), first_stage)
