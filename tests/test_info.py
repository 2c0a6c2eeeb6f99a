"""``latentdiff info MODEL`` on the bundled native models, a tiny SD single file and its diffusers folder; and the
warning that names the words a native model's own word tokenizer does not know."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_golden import tiny_sd_file

from latentdiff.cli import main
from latentdiff.cli.info import VOCAB_SHOWN, model_info
from latentdiff.conditioning.text import WordTokenizer
from latentdiff.formats import convert, read_components
from latentdiff.io.files import file_sha256
from latentdiff.pipelines import load_pipeline

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def sd_models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("info_sd")
    single = tiny_sd_file(folder)
    return {"single": single, "diffusers": convert(single, folder / "diffusers", "diffusers")}


def _info_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name, task, verb, inputs", [
    ("scenes-txt2img", "text-to-image", "generate", ["caption"]),
    ("scenes-seg2img", "semantic synthesis (class map to image)", "seg2img", ["class_map"]),
    ("scenes-upscale", "super-resolution", "upscale", ["image"]),
    ("scenes-inpaint", "inpainting", "inpaint", ["caption", "image"]),
])
def test_info_on_the_bundled_models(name, task, verb, inputs, capsys) -> None:
    path = MODELS / name
    info = _info_json(capsys, str(path))
    weights = path / "model.safetensors"
    assert info["format"] == "native" and info["kind"] == f"latentdiff model trained here: {task}"
    assert info["verb"] == verb and [e["name"] for e in info["embedders"]] == inputs
    assert info["sha256"] == file_sha256(weights) and info["short_hash"] == info["sha256"][:10]
    assert info["size_bytes"] == sum(f.stat().st_size for f in path.iterdir())
    pipe = load_pipeline(path)
    model = pipe.model
    assert info["parameters"]["unet"] == sum(p.numel() for p in model.model.parameters())
    assert info["parameters"]["first_stage"] == sum(p.numel() for p in model.first_stage_model.parameters())
    assert info["defaults"] == {"sampler": "dpmpp_2m", "steps": 25, "guidance": pipe.default_guidance,
                                "image_size": 32}
    first = info["architecture"]["first_stage"]
    assert (first["type"], first["factor"], first["latent_channels"]) == ("KL", pipe.vae_factor, pipe.latent_channels)
    unet = info["architecture"]["unet"]
    assert unet["channels"] == [model.config.unet.model_channels * m for m in model.config.unet.channel_mult]
    assert unet["context_dim"] == model.config.unet.context_dim


def test_info_lists_the_word_vocabulary(capsys) -> None:
    path = MODELS / "scenes-txt2img"
    vocab = load_pipeline(path).model.config.conditioner.embedder("caption").text.vocab
    info = _info_json(capsys, str(path), "--vocab")
    assert info["tokenizer"]["words"] == vocab and info["tokenizer"]["size"] == len(vocab)
    assert info["parameters"]["conditioner"] > 0
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{len(vocab)} words" in out and " ".join(vocab[:VOCAB_SHOWN]) in out
    assert "latentdiff generate" in out and "sha256:" in out and "KL, factor 4" in out


def test_info_on_stable_diffusion_files(sd_models, capsys) -> None:
    single = _info_json(capsys, str(sd_models["single"]))
    assert single["format"] == "original" and single["kind"] == "Stable Diffusion v1"
    assert single["sha256"] == file_sha256(sd_models["single"])
    assert single["tokenizer"] == {"kind": "CLIP BPE", "size": 49408}
    assert single["embedders"][0]["name"] == "caption" and single["defaults"]["guidance"] == 7.5
    folder = model_info(sd_models["diffusers"])
    assert folder["format"] == "diffusers" and "sha256" not in folder
    assert folder["parameters"] == single["parameters"] and folder["architecture"] == single["architecture"]
    assert single["architecture"]["unet"]["channels"] == [32, 64]
    assert single["architecture"]["unet"]["context_dim"] == 32
    assert main(["info", str(sd_models["diffusers"])]) == 0
    assert "diffusers folder" in capsys.readouterr().out
    assert main(["info", str(sd_models["single"].parent / "missing.safetensors")]) == 2
    assert capsys.readouterr().err.startswith("latentdiff: error: checkpoint not found")


def test_unknown_words_known_answer() -> None:
    tokenizer = WordTokenizer(["a", "red", "t-shirt"])
    # In order of appearance, each once; punctuation the captions never had is [UNK] too.
    assert tokenizer.unknown_words("A red T-shirt, a GREEN zebra and a green hat!") == [",", "green", "zebra", "and",
                                                                                        "hat", "!"]
    assert tokenizer.unknown_words("a red t-shirt") == []


def test_native_generation_warns_once_naming_unknown_words(caplog) -> None:
    pipe = load_pipeline(MODELS / "scenes-txt2img")
    run = dict(steps=1, sampler="ddim", generator=0, decode=False, progress=False)
    with caplog.at_level(logging.WARNING):
        pipe.text_to_image(["a red zebra", "a blue sneaker"], "a purple unicorn zebra", num_images=2, **run)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "read as [UNK]: zebra, unicorn" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pipe.text_to_image("a red sneaker on the left", **run)
        pipe.text_to_image("a red zebra", **run)  # the next batch of a run: zebra was named already
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    with caplog.at_level(logging.WARNING):
        pipe.text_to_image("a red okapi zebra", **run)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].getMessage().split("[UNK]: ")[1].startswith("okapi (")


def test_info_on_a_native_autoencoder(first_stage, capsys) -> None:
    info = _info_json(capsys, str(first_stage))
    assert info["kind"] == "autoencoder only (a first stage, no UNet)" and info["verb"] is None
    vae = read_components(first_stage).vae
    assert info["parameters"] == {"first_stage": sum(t.numel() for t in vae.values())}
    assert info["architecture"]["first_stage"]["factor"] == 2 and "defaults" not in info
