"""LoRA files at generation time (``--lora FILE[:SCALE]``, ``load_pipeline(..., loras=...)``): two random LoRAs, one
kohya file with a LoCon part (3x3 conv factors of a ResBlock) and one diffusers/PEFT file, fused at their own scales
into the tiny SD model, give the image of diffusers' ``load_lora_weights`` + ``set_adapters`` with the same scales.
The issue asks for 1/255; we assert 1e-4, as tests/test_sd_pipeline.py does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_sd_pipeline import (
    PROMPT,
    UNET,
    initial_latents,
    load_theirs,
    max_diff,
    one_error_line,
    run_cli,
    tiny_components,
    with_scheduler,
    write_tokenizer,
)

from latentdiff.formats import save_diffusers
from latentdiff.formats.lora import LoRAPair, LoRAWeights, write_lora
from latentdiff.io.errors import CheckpointError
from latentdiff.pipelines import load_pipeline
from latentdiff.pipelines.metadata import read_png_parameters

TOL = 1e-4
SCALES = (0.8, -0.5)
RUN = dict(guidance_scale=7.5, steps=4, sampler="ddim")


def _pairs(shapes: dict[str, torch.Size], paths: list[str], rank: int, alpha: float, seed: int) -> dict[str, LoRAPair]:
    """Random factors small enough that the image moves without saturating; a conv's down factor keeps its kernel."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for path in paths:
        out, inp, *kernel = shapes[path]
        pairs[path] = LoRAPair(0.2 * torch.randn(rank, inp, *kernel, generator=g),
                               0.2 * torch.randn(out, rank, *([1, 1] if kernel else []), generator=g), alpha)
    return pairs


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_loading")
    comps = tiny_components(UNET, seed=0, tokenizer=write_tokenizer(root / "tokenizer"))
    shapes = {k[:-len(".weight")]: v.shape for k, v in {**comps.unet, **comps.text_encoder}.items()
              if k.endswith(".weight")}
    kohya = LoRAWeights(
        _pairs(shapes, ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.0.in_layers.2",
                        "output_blocks.1.0.out_layers.3"], rank=4, alpha=2.0, seed=1),
        # diffusers recognises a text-encoder part (either file format) by an out_proj: real files adapt q, k, v, out
        _pairs(shapes, [f"text_model.encoder.layers.0.self_attn.{p}" for p in ("q_proj", "out_proj")],
               rank=4, alpha=2.0, seed=2))
    peft = LoRAWeights(
        _pairs(shapes, ["middle_block.1.transformer_blocks.0.attn2.to_v", "input_blocks.1.1.proj_in"],
               rank=2, alpha=2.0, seed=3),
        _pairs(shapes, ["text_model.encoder.layers.1.mlp.fc1", "text_model.encoder.layers.1.self_attn.out_proj"],
               rank=2, alpha=2.0, seed=4))
    return {"base": save_diffusers(comps, root / "base"),
            "kohya": write_lora(kohya, UNET, root / "style_kohya.safetensors", "kohya"),
            "peft": write_lora(peft, UNET, root / "pytorch_lora_weights.safetensors", "peft")}


def _ours(files: dict[str, Path], loras: list[tuple[Path, float]]) -> torch.Tensor:
    pipe = load_pipeline(files["base"], loras=loras)
    return pipe.text_to_image(PROMPT, latents=initial_latents(), generator=1, **RUN).images


def _theirs(files: dict[str, Path], names: list[str], scales: tuple[float, ...]) -> torch.Tensor:
    pipe = with_scheduler(load_theirs(files["base"]), "ddim")
    for name in names:
        pipe.load_lora_weights(str(files[name].parent), weight_name=files[name].name, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=list(scales))
    return pipe(PROMPT, guidance_scale=7.5, num_inference_steps=4, latents=initial_latents(),
                generator=torch.Generator().manual_seed(1), output_type="pt").images


@pytest.mark.parametrize("name", ["kohya", "peft"])
def test_one_lora_at_a_scale_matches_diffusers(lora_files, name) -> None:
    got = _ours(lora_files, [(lora_files[name], 0.7)])
    assert max_diff(got, _theirs(lora_files, [name], (0.7,))) <= TOL
    assert max_diff(got, _ours(lora_files, [])) > 20 * TOL  # the LoRA matters


def test_two_loras_with_their_own_scales_match_diffusers(lora_files) -> None:
    got = _ours(lora_files, [(lora_files["kohya"], SCALES[0]), (lora_files["peft"], SCALES[1])])
    assert max_diff(got, _theirs(lora_files, ["kohya", "peft"], SCALES)) <= TOL
    only_first = _ours(lora_files, [(lora_files["kohya"], SCALES[0])])
    assert max_diff(got, only_first) > 20 * TOL  # the second file counts too


def test_cli_lora_flags_give_the_pipeline_image(tmp_path, capsys, lora_files) -> None:
    out = tmp_path / "out.png"
    code, stdout, _ = run_cli(capsys, "generate", PROMPT, "--steps", 3, "--sampler", "ddim", "--model",
                              lora_files["base"], "--lora", f"{lora_files['kohya']}:{SCALES[0]}", "--lora",
                              lora_files["peft"], "-o", out)
    assert code == 0 and "wrote 1 image" in stdout
    pipe = load_pipeline(lora_files["base"], loras=[(lora_files["kohya"], SCALES[0]), (lora_files["peft"], 1.0)])
    expected = pipe.text_to_image(PROMPT, steps=3, sampler="ddim", generator=0).pil()[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_png_records_loras_and_clip_skip_and_from_png_reproduces_them(tmp_path, capsys, lora_files) -> None:
    """The PNG names each LoRA with its scale and hash (A1111's "Lora hashes") and the clip skip; --from-png finds
    the LoRA files again by name and gives the same bytes."""
    out, again = tmp_path / "out.png", tmp_path / "again.png"
    code, _, _ = run_cli(capsys, "generate", PROMPT, "--steps", 2, "--sampler", "ddim", "--model", lora_files["base"],
                         "--lora", f"{lora_files['kohya']}:{SCALES[0]}", "--clip-skip", 2, "-o", out)
    assert code == 0
    text = Image.open(out).text["parameters"]
    assert "Clip skip: 2" in text and f'Lora hashes: "{lora_files["kohya"].stem}: ' in text
    record = read_png_parameters(out)
    assert record["clip_skip"] == 2 and record["loras"][0]["scale"] == SCALES[0]
    with pytest.MonkeyPatch.context() as m:  # the LoRA is found by its file name, as a model is
        m.chdir(lora_files["kohya"].parent)
        assert run_cli(capsys, "generate", "--from-png", out, "--model", lora_files["base"], "-o", again)[0] == 0
    assert again.read_bytes() == out.read_bytes()


def test_bad_lora_files_are_one_line(tmp_path, capsys, lora_files) -> None:
    args = ("generate", PROMPT, "--steps", 1, "--model", lora_files["base"], "-o", tmp_path / "x.png", "--lora")
    one_error_line(*run_cli(capsys, *args, tmp_path / "missing.safetensors:0.5")[::2], "not found")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    one_error_line(*run_cli(capsys, *args, tmp_path / "junk.safetensors")[::2], "not a readable safetensors")
    with pytest.raises(CheckpointError, match="not a LoRA file"):
        load_pipeline(lora_files["base"], loras=[(lora_files["base"] / "unet" / "diffusion_pytorch_model.safetensors",
                                                  1.0)])
    assert not (tmp_path / "x.png").exists()
