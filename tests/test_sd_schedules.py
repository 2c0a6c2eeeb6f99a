"""Every sampler x {text-to-image, img2img, inpainting} against diffusers, under the scheduler config that the hub's
SD 1.5 files carry (no ``timestep_spacing`` key: each scheduler class's own default) and with explicit "leading",
"linspace" and "trailing" spacing; Karras / exponential sigmas; A1111's sampler names.

The tiny SD v1 model and the comparison helpers are ``test_sd_pipeline``'s. 10 steps of 1000 keep diffusers'
"linspace" timesteps whole for every scheduler; ``test_fractional_linspace_timesteps`` takes 7 steps, where Euler's
and Heun's are fractional. Tolerance as there (1e-4 per pixel in [0, 1]).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_sd_pipeline import (
    NEGATIVE,
    PROMPT,
    SCHEDULER_OPTIONS,
    SCHEDULERS,
    STEPS,
    TOL,
    UNET,
    initial_latents,
    load_theirs,
    max_diff,
    sample_image,
    sample_mask,
    tiny_components,
    write_tokenizer,
)

from latentdiff import cli
from latentdiff.diffusion.noise_levels import LevelOptions, sampler_sigmas, sampler_timesteps
from latentdiff.diffusion.samplers import SAMPLER_ALIASES, get_sampler, resolve_sampler
from latentdiff.diffusion.schedule import NoiseSchedule
from latentdiff.formats import save_diffusers, save_original
from latentdiff.pipelines import load_pipeline

diffusers = pytest.importorskip("diffusers")

HUB = None  # the hub SD 1.5 scheduler config: no timestep_spacing key
HUB_CONFIG = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
              "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None}
SPACINGS = (HUB, "leading", "linspace", "trailing")
# diffusers' DDIM and PNDM step by T // n whatever the spacing, so with "linspace" they land between the levels they
# visit and evaluate the UNet at the next listed level with a latent of another level; at strength < 1 PNDM's list
# also loses its repeated warm-up level. Our DDIM (landing_sigmas) and PLMS (diffusers_plan) do the same there, so
# no (sampler, spacing) pair and no sampler part way is left out; the sets name exceptions.
OFF_LEVEL: set[tuple[str, str]] = set()
PART_WAY: set[str] = set()


def scheduler_for(pipe, sampler: str, spacing: str | None, **config):
    """``pipe`` with diffusers' scheduler for ``sampler``, from the hub SD 1.5 config (plus ``spacing`` and
    ``config``). Not from ``pipe.scheduler.config``: a loaded scheduler's config lists the keys its file lacked
    (``_use_default_values``), and ``from_config`` drops them even when given."""
    extra = dict(SCHEDULER_OPTIONS.get(sampler, {}), **config)
    if spacing is not None:
        extra["timestep_spacing"] = spacing
    pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(dict(HUB_CONFIG, **extra))
    return pipe


def task_pipeline(theirs, task: str, sampler: str, spacing: str | None):
    """diffusers' ``task`` pipeline (e.g. "Img2Img") over ``theirs``' components, with the scheduler for ``sampler``."""
    pipe = scheduler_for(getattr(diffusers, f"StableDiffusion{task}Pipeline")(**theirs.components), sampler, spacing)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory) -> Path:
    """The tiny SD v1 model as a diffusers folder with the hub SD 1.5 scheduler config."""
    root = tmp_path_factory.mktemp("sd_hub")
    return save_diffusers(tiny_components(UNET, seed=0, tokenizer=write_tokenizer(root / "tokenizer")), root / "v1")


@pytest.fixture(scope="module")
def sd(hub_folder):
    return load_pipeline(hub_folder), load_theirs(hub_folder)


def cases(part_way: bool = False) -> list:
    return [pytest.param(sampler, spacing, id=f"{sampler}-{spacing or 'hub'}") for sampler in SCHEDULERS
            for spacing in SPACINGS if (sampler, spacing) not in OFF_LEVEL and not (part_way and sampler in PART_WAY)]


def test_the_written_folder_carries_the_hub_config(hub_folder) -> None:
    config = json.loads((Path(hub_folder) / "scheduler" / "scheduler_config.json").read_text())
    assert config == dict(HUB_CONFIG, prediction_type="epsilon")


@pytest.mark.parametrize("sampler, spacing", cases())
def test_text_to_image_every_spacing(sd, sampler: str, spacing: str | None) -> None:
    ours, theirs = sd
    latents = initial_latents()
    expected = scheduler_for(theirs, sampler, spacing)(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, latents=latents,
        generator=torch.Generator().manual_seed(1), output_type="pt").images
    got = ours.text_to_image(PROMPT, NEGATIVE, steps=STEPS, sampler=sampler, latents=latents, generator=1,
                             spacing=spacing).images
    assert max_diff(got, expected) <= TOL


@pytest.mark.parametrize("sampler, spacing", cases(part_way=True))
def test_img2img_every_spacing(sd, sampler: str, spacing: str | None) -> None:
    ours, theirs = sd
    expected = task_pipeline(theirs, "Img2Img", sampler, spacing)(
        PROMPT, image=sample_image(), strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(3), output_type="pt").images
    got = ours.image_to_image(sample_image(), PROMPT, NEGATIVE, strength=0.6, steps=STEPS, sampler=sampler,
                              generator=3, spacing=spacing).images
    assert max_diff(got, expected) <= TOL


@pytest.mark.parametrize("sampler, spacing", cases(part_way=True))
def test_inpaint_every_spacing(sd, sampler: str, spacing: str | None) -> None:
    """The text-to-image UNet at strength 0.7 (starting part way, as img2img); at full strength from given noise."""
    ours, theirs = sd
    inpaint = task_pipeline(theirs, "Inpaint", sampler, spacing)
    latents = initial_latents(3)
    expected = inpaint(PROMPT, image=sample_image(), mask_image=sample_mask(), negative_prompt=NEGATIVE, strength=0.7,
                       num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7), output_type="pt").images
    got = ours.inpaint(sample_image(), sample_mask(), PROMPT, NEGATIVE, strength=0.7, steps=STEPS, sampler=sampler,
                       generator=7, spacing=spacing).images
    assert max_diff(got, expected) <= TOL
    if spacing is HUB:  # full strength from the given noise
        expected = inpaint(PROMPT, image=sample_image(), mask_image=sample_mask(), num_inference_steps=STEPS,
                           latents=latents, generator=torch.Generator().manual_seed(7), output_type="pt").images
        got = ours.inpaint(sample_image(), sample_mask(), PROMPT, steps=STEPS, sampler=sampler, latents=latents,
                           generator=7).images
        assert max_diff(got, expected) <= TOL


@pytest.mark.parametrize("sampler, ramp", [("euler", "karras"), ("heun", "karras"), ("dpmpp_2m", "karras"),
                                           ("dpmpp_2m_sde", "karras"), ("unipc", "karras"),
                                           ("euler", "exponential"), ("heun", "exponential")])
def test_sigma_ramps_match_diffusers(sd, sampler: str, ramp: str) -> None:
    """(DPM-Solver and UniPC with exponential sigmas are left out: diffusers truncates their fractional timesteps to
    integers, where we round them as for its Karras ramp; 0.006 apart on this model.)"""
    ours, theirs = sd
    latents = initial_latents()
    theirs = scheduler_for(theirs, sampler, HUB, **{f"use_{ramp}_sigmas": True})
    expected = theirs(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, latents=latents,
                      generator=torch.Generator().manual_seed(4), output_type="pt").images
    got = ours.text_to_image(PROMPT, NEGATIVE, steps=STEPS, sampler=sampler, latents=latents, sigma_ramp=ramp,
                             generator=4).images
    assert max_diff(got, expected) <= TOL


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler_ancestral"])
def test_fractional_linspace_timesteps(sd, sampler: str) -> None:
    """7 steps: diffusers' sigma schedulers visit 999, 832.5, 666, ... and interpolate sigma linearly."""
    ours, theirs = sd
    assert sampler_timesteps(sampler, 7)[:3] == [999, 832.5, 666]
    latents = initial_latents()
    expected = scheduler_for(theirs, sampler, HUB)(PROMPT, num_inference_steps=7, latents=latents,
                                                   generator=torch.Generator().manual_seed(2), output_type="pt").images
    got = ours.text_to_image(PROMPT, steps=7, sampler=sampler, latents=latents, generator=2).images
    assert max_diff(got, expected) <= TOL


def test_scheduler_config_of_a_folder_is_followed(tmp_path: Path, sd) -> None:
    """A folder whose config says trailing and Karras gives that by default; a single file, the hub defaults."""
    ours, _ = sd
    comps = tiny_components(UNET, seed=0, tokenizer=write_tokenizer(tmp_path / "tok"))
    comps.scheduler_config = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                              "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "trailing",
                              "use_karras_sigmas": True}
    folder = load_pipeline(save_diffusers(comps, tmp_path / "sd"))
    assert folder.levels == LevelOptions("trailing", 1, "karras")
    latents = initial_latents()
    got = folder.text_to_image(PROMPT, steps=4, sampler="euler", latents=latents).images
    want = ours.text_to_image(PROMPT, steps=4, sampler="euler", latents=latents, spacing="trailing",
                              sigma_ramp="karras").images
    assert torch.equal(got, want)
    assert not torch.equal(ours.text_to_image(PROMPT, steps=4, sampler="euler", latents=latents).images, want)
    # DDIM ignores the config's Karras sigmas, as diffusers' DDIMScheduler does; asked for explicitly, it is refused.
    folder.text_to_image(PROMPT, steps=2, sampler="ddim", latents=latents)
    with pytest.raises(ValueError, match="karras sigmas apply to"):
        ours.text_to_image(PROMPT, steps=2, sampler="ddim", sigma_ramp="karras")
    single = load_pipeline(save_original(tiny_components(UNET, seed=0), tmp_path / "sd.safetensors"))
    assert single.levels == LevelOptions(None, 1, None)


def test_euler_starts_at_sigma_max_with_linspace(sd) -> None:
    """diffusers' init_noise_sigma: sigma_max for "linspace"/"trailing" (as A1111), sqrt(1 + sigma_max^2) for
    "leading"; the first denoiser call sees the noise scaled so."""
    ours, _ = sd
    seen = []
    latents = initial_latents()
    for spacing in ("linspace", "leading"):
        ours.text_to_image(PROMPT, steps=2, sampler="euler", latents=latents, spacing=spacing, decode=False,
                           callback=lambda info: seen.append((info["x"], float(info["sigma"]))) if info["i"] == 0
                           else None)
    (x_lin, s_lin), (x_lead, s_lead) = seen
    torch.testing.assert_close(x_lin, latents * s_lin)
    torch.testing.assert_close(x_lead, latents * math.sqrt(1 + s_lead ** 2))


def unet_calls(unet: torch.nn.Module, run) -> list[tuple[float, torch.Tensor]]:
    """(timestep, input latent) of every call of ``unet`` while ``run()`` runs."""
    calls = []
    handle = unet.register_forward_pre_hook(lambda _, args: calls.append((float(args[1].reshape(-1)[0]), args[0])))
    try:
        run()
    finally:
        handle.remove()
    return calls


@pytest.mark.parametrize("strength", [0.9, 0.8, 0.35])
def test_plms_img2img_every_call_as_diffusers(sd, strength: float) -> None:
    """One level skipped (0.9 of 10 steps: diffusers' list starts with its repeated level), two, and most: every UNet
    call's timestep and latent, and the image, are diffusers'."""
    ours, theirs = sd
    img2img = task_pipeline(theirs, "Img2Img", "plms", HUB)
    run = dict(strength=strength, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3))
    expected = unet_calls(theirs.unet, lambda: img2img(PROMPT, image=sample_image(), output_type="latent", **run))
    got = unet_calls(ours.unet, lambda: ours.image_to_image(sample_image(), PROMPT, strength=strength, steps=STEPS,
                                                            sampler="plms", generator=3, decode=False))
    assert [t for t, _ in got] == [t for t, _ in expected]
    for (_, x_ours), (_, x_theirs) in zip(got, expected, strict=True):
        torch.testing.assert_close(x_ours, x_theirs, rtol=0, atol=1e-4)
    run["generator"] = torch.Generator().manual_seed(3)
    image = img2img(PROMPT, image=sample_image(), output_type="pt", **run).images
    mine = ours.image_to_image(sample_image(), PROMPT, strength=strength, steps=STEPS, sampler="plms", generator=3)
    assert max_diff(mine.images, image) <= TOL


@pytest.mark.parametrize("spacing", [HUB, "trailing"])
def test_plms_img2img_starts_where_diffusers_does(sd, spacing: str | None) -> None:
    """Strength 0.6 of 10 steps: both noise the image to 601 (trailing: 699) and warm up from there to the next
    level, with the same two UNet calls on the same latents (before the fix we started at 501)."""
    ours, theirs = sd
    img2img = task_pipeline(theirs, "Img2Img", "plms", spacing)
    expected = unet_calls(theirs.unet, lambda: img2img(
        PROMPT, image=sample_image(), strength=0.6, num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(3), output_type="latent"))
    got = unet_calls(ours.unet, lambda: ours.image_to_image(sample_image(), PROMPT, strength=0.6, steps=STEPS,
                                                            sampler="plms", generator=3, spacing=spacing,
                                                            decode=False))
    assert [t for t, _ in got[:2]] == [t for t, _ in expected[:2]] == ([601, 501] if spacing is HUB else [699, 599])
    # every call: the same timesteps (the third on the latent of the level before, as diffusers) and latents
    assert [t for t, _ in got] == [t for t, _ in expected]
    for (_, x_ours), (_, x_theirs) in zip(got, expected, strict=True):
        torch.testing.assert_close(x_ours, x_theirs, rtol=0, atol=1e-4)


def test_plms_warmup_starts_one_level_earlier() -> None:
    """PNDM's list repeats its second level for the warm-up, and diffusers' img2img skips entries of that list: at
    strength 0.6 of 10 steps it starts at 601, not 501."""
    schedule = NoiseSchedule()
    full = sampler_sigmas(schedule, "plms", 10, spacing="leading")
    assert torch.equal(sampler_sigmas(schedule, "plms", 10, spacing="leading", strength=0.6), full[3:])
    assert float(full[3]) == pytest.approx(float(schedule.sigmas[601]))
    ddim = sampler_sigmas(schedule, "ddim", 10, spacing="leading")
    assert torch.equal(sampler_sigmas(schedule, "ddim", 10, spacing="leading", strength=0.6), ddim[4:])


def test_diffusers_ddim_linspace_steps_off_its_levels() -> None:
    """The same timesteps are visited, but diffusers' DDIM steps by T // n (landing_sigmas reproduces it)."""
    scheduler = diffusers.DDIMScheduler.from_config(dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                         beta_end=0.012, timestep_spacing="linspace"))
    scheduler.set_timesteps(STEPS)
    visited = [int(t) for t in scheduler.timesteps]
    assert sampler_timesteps("ddim", STEPS, spacing="linspace") == visited
    assert visited[0] - visited[1] != 1000 // STEPS


def test_a1111_names_are_aliases() -> None:
    assert resolve_sampler("DPM++ 2M Karras") == (get_sampler("dpmpp_2m"), "karras")
    assert resolve_sampler("euler a") == (get_sampler("euler_ancestral"), None)
    assert resolve_sampler("DPM++ 3M SDE Exponential") == (get_sampler("dpmpp_3m_sde"), "exponential")
    assert resolve_sampler("unipc") == resolve_sampler("UniPC") == (get_sampler("unipc"), None)
    assert all(get_sampler(alias).name in SCHEDULERS for alias in SAMPLER_ALIASES if "3M" not in alias)
    with pytest.raises(ValueError, match="AUTOMATIC1111"):
        get_sampler("LMS")


def test_cli_spacing_ramp_and_a1111_names(tmp_path: Path, capsys, hub_folder, sd) -> None:
    ours, _ = sd
    common = [PROMPT, "--steps", "3", "--seed", "2", "--model", str(hub_folder)]
    assert cli.main(["generate", *common, "--sampler", "DPM++ 2M Karras", "-o", str(tmp_path / "a.png")]) == 0
    assert cli.main(["generate", *common, "--sampler", "dpmpp_2m", "--karras", "-o", str(tmp_path / "b.png")]) == 0
    # the same image; the PNGs' recorded parameters name the sampler as each command did
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    assert cli.main(["generate", *common, "--sampler", "euler", "--spacing", "trailing", "-o",
                     str(tmp_path / "c.png")]) == 0
    want = ours.text_to_image(PROMPT, steps=3, sampler="euler", generator=2, spacing="trailing").pil()[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), np.asarray(want))
    capsys.readouterr()
    assert cli.main(["generate", *common, "--sampler", "ddim", "--karras", "-o", str(tmp_path / "d.png")]) == 2
    assert capsys.readouterr().err.strip().startswith("latentdiff: error: ddim steps between")
    assert cli.main(["generate", *common, "--spacing", "middle"]) == 2
