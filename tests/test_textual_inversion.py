"""Textual-inversion training (``task: textual_inversion``) on the tiny SD model: only the new word's rows move, the
checkpoint is the base, the two embedding files beside it load in our ``--embedding`` and in diffusers'
``load_textual_inversion`` with the same image (asserted at 1e-4 as tests/test_embeddings.py; the issue: 1/255),
resume is exact, and bad set-ups are one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import test_sd_pipeline as sd
import torch
from PIL import Image
from safetensors.torch import load_file

from latentdiff.config import ConfigError, load_config
from latentdiff.formats import read_components, save_diffusers
from latentdiff.io.checkpoint import read_checkpoint
from latentdiff.pipelines import load_pipeline
from latentdiff.train.textual_inversion import TextualInversionExperiment, TextualInversionTrainer

TOL = 1e-4
TOKEN = "<toy>"
PROMPT = "a photo of <toy> on a beach"
EMBEDDING_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def write_images(folder, count: int, seed: int, size: int = 32) -> None:
    """``count`` seeded RGB images of coloured blocks, without captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(np.kron(blocks, np.ones((size // 4, size // 4, 1), dtype=np.uint8))).save(folder / f"{i}.png")


def experiment(base, data, out_dir, **overrides: str) -> TextualInversionExperiment:
    config = {"task": "textual_inversion", "init_from": str(base),
              "textual_inversion": {"token": TOKEN, "init_word": "toy", "vectors": 2},
              "data": {"path": str(data), "image_size": 32, "channels": 3, "random_flip": False},
              "train": {"out_dir": str(out_dir), "steps": 3, "batch_size": 2, "lr": 0.05, "ckpt_every": 0,
                        "sample_every": 0, "log_every": 1, "warmup_steps": 0, "threads": 1,
                        "betas": [0.9, 0.999], "weight_decay": 0.01},
              "sample_images": 1, "sample_steps": 1}
    return load_config(TextualInversionExperiment, config, [f"{k}={v}" for k, v in overrides.items()])


def tiny_sd_base(root) -> Path:
    """The tiny SD model as a diffusers folder under ``root`` (its tokenizer pads with the end token, as SD v1)."""
    return save_diffusers(sd.tiny_components(sd.UNET, seed=0, tokenizer=sd.write_tokenizer(root / "tokenizer")),
                          root / "base")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti")
    base = tiny_sd_base(root)
    write_images(root / "toy", 3, seed=0)
    trainer = TextualInversionTrainer(experiment(base, root / "toy", root / "run"))
    run = trainer.run()
    return base, root, trainer, run / "checkpoints" / "step_0000003"


def test_only_the_new_rows_train_and_the_checkpoint_is_the_base(trained) -> None:
    base, _, trainer, checkpoint = trained
    learned = load_file(str(checkpoint / "learned_embeds.safetensors"))
    a1111 = load_file(str(checkpoint / f"{TOKEN}.safetensors"))
    assert set(learned) == {TOKEN} and set(a1111) == {"emb_params"}
    assert learned[TOKEN].shape == (2, 32) and torch.equal(learned[TOKEN], a1111["emb_params"])
    base_rows = read_components(base).text_encoder["text_model.embeddings.token_embedding.weight"]
    init = base_rows[trainer.model.cond_stage_model.transformer.tokenizer.text_to_ids("toy")].expand(2, -1)
    assert (learned[TOKEN] - init).abs().max() > 1e-3  # the word's vectors moved
    weights, config = read_checkpoint(checkpoint)
    assert torch.equal(weights[EMBEDDING_KEY], base_rows)  # weight decay did not touch the old rows
    assert config["model"]["conditioner"]["embedders"][0]["model"]["vocab_size"] == base_rows.shape[0]
    unet_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(weights[unet_key], read_components(base).unet[unet_key[len("model.diffusion_model."):]])


@pytest.mark.parametrize("file_name", ["learned_embeds.safetensors", f"{TOKEN}.safetensors"])
def test_trained_embedding_loads_in_diffusers_with_our_image(trained, file_name) -> None:
    base, _, _, checkpoint = trained
    ours = load_pipeline(base, embeddings=[checkpoint / file_name])
    theirs = sd.with_scheduler(sd.load_theirs(base), "ddim")
    theirs.load_textual_inversion(str(checkpoint / file_name), token=TOKEN)
    run = dict(guidance_scale=7.5, steps=4, sampler="ddim")
    got = ours.text_to_image(PROMPT, latents=sd.initial_latents(), generator=1, **run).images
    expected = theirs(PROMPT, guidance_scale=7.5, num_inference_steps=4, latents=sd.initial_latents(),
                      generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert sd.max_diff(got, expected) <= TOL
    plain = load_pipeline(base).text_to_image(PROMPT.replace(TOKEN, "toy"), latents=sd.initial_latents(),
                                              generator=1, **run).images
    assert sd.max_diff(got, plain) > 20 * TOL  # the learned vectors matter


def test_resume_continues_exactly(trained) -> None:
    base, root, _, checkpoint = trained
    TextualInversionTrainer(experiment(base, root / "toy", root / "two", **{"train.steps": "2"})).run()
    TextualInversionTrainer(experiment(base, root / "toy", root / "two"), resume=root / "two").run()
    a = load_file(str(checkpoint / "learned_embeds.safetensors"))[TOKEN]
    b = load_file(str(root / "two" / "checkpoints" / "step_0000003" / "learned_embeds.safetensors"))[TOKEN]
    assert torch.equal(a, b)


def test_bad_set_ups_are_one_clear_error(trained, tmp_path) -> None:
    base, root, _, _ = trained
    with pytest.raises(ConfigError, match="needs a CLIP text encoder"):
        TextualInversionTrainer(experiment("models/scenes-txt2img", root / "toy", tmp_path / "a")).run()
    with pytest.raises(ValueError, match="set init_from"):
        experiment("", root / "toy", tmp_path / "b")
    with pytest.raises(ValueError, match="one word without spaces"):
        experiment(base, root / "toy", tmp_path / "c", **{"textual_inversion.token": "two words"})
    with pytest.raises(ValueError, match="cannot be an added word"):
        TextualInversionTrainer(experiment(base, root / "toy", tmp_path / "d",
                                           **{"textual_inversion.token": "x&amp;y"})).run()
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()
