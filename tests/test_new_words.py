"""New words for a fine-tuned model's own text encoder (train/new_words.py, TextTransformer.add_words): old ids and
encodings unchanged, the new word no longer [UNK], saved with the model and loaded by generate, trained with LoRA
(its rows only) and in a full fine-tune, resumed exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latentdiff.cli import main
from latentdiff.conditioning.text import TextTransformer, TextTransformerConfig
from latentdiff.config import ConfigError, load_config
from latentdiff.data.datasets import FASHION_MNIST_DIR, _load_fashion_mnist
from latentdiff.data.scenes import FashionScenes, SceneAttribute, render_scene
from latentdiff.eval.prompt_accuracy import CheckerConfig, FashionClassifier, PromptChecker, prompt_accuracy
from latentdiff.formats.native import load_latent_diffusion
from latentdiff.io.checkpoint import read_checkpoint
from latentdiff.train.diffusion import DiffusionExperiment, DiffusionTrainer
from latentdiff.train.new_words import EMBEDDING_KEY

BASE = "models/scenes-txt2img"
PINK = (240, 120, 190)


def tiny_encoder() -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(TextTransformerConfig(vocab=["a", "red", "square", "left"], max_length=8, width=16,
                                                 layers=1, heads=2)).eval()


def test_added_words_keep_every_old_id_and_encoding_and_are_no_longer_unknown():
    encoder = tiny_encoder()
    old_prompts = ["a red square on the left", "a square", ""]  # "on", "the": [UNK] before and after
    ids_before, _ = encoder.tokenize(old_prompts)
    states_before, _ = encoder(old_prompts)
    rows_before = encoder.token_embedding.weight.detach().clone()
    assert encoder.tokenize("a pink square")[0][0, 2] == encoder.tokenizer.unk_token_id
    encoder.add_words(["pink", "violet"], init_word="red")
    ids_after, _ = encoder.tokenize(old_prompts)
    assert torch.equal(ids_after, ids_before)
    torch.testing.assert_close(encoder(old_prompts)[0], states_before, rtol=0, atol=0)
    pink, _ = encoder.tokenize("a pink square")
    assert encoder.tokenizer.unk_token_id not in pink[0].tolist()
    assert encoder.tokenizer.decode(pink[0]) == "a pink square" and encoder.config.vocab[-2:] == ["pink", "violet"]
    weight = encoder.token_embedding.weight.detach()
    red = encoder.tokenizer.ids["red"]
    assert weight.shape == (4 + 6, 16) and torch.equal(weight[:8], rows_before)
    assert torch.equal(weight[8], rows_before[red]) and torch.equal(weight[9], rows_before[red])
    mean = tiny_encoder()
    mean.add_words(["pink"])
    assert torch.allclose(mean.token_embedding.weight[-1], rows_before[4:].mean(0))
    for bad, match in ((["red"], "there already"), (["two words"], "not one lower-case word"),
                       (["pink", "pink"], "repeat")):
        with pytest.raises(ValueError, match=match):
            tiny_encoder().add_words(bad)
    with pytest.raises(ValueError, match="'violet' is not in the vocabulary"):
        tiny_encoder().add_words(["pink"], init_word="violet")


def pink_folder(root: Path) -> Path:
    """32x32 pictures captioned with a word the base model never saw ("pink") next to ones it knows."""
    root.mkdir(parents=True)
    for i in range(6):
        colour, word = (PINK, "pink") if i % 2 == 0 else ((220, 30, 30), "red")
        img = Image.new("RGB", (32, 32), (0, 0, 0))
        img.paste(colour, (0, 0, 16, 32) if i % 3 else (16, 0, 32, 32))
        img.save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a {word} shirt on the {'left' if i % 3 else 'right'} mauve")
    return root


def experiment(folder: Path, out: Path, **overrides: str) -> DiffusionExperiment:
    data = {"task": "diffusion", "init_from": BASE, "new_words": "auto",
            "data": {"path": str(folder), "image_size": 32, "channels": 3},
            "train": {"out_dir": str(out), "steps": 3, "batch_size": 2, "lr": 0.01, "ckpt_every": 0,
                      "sample_every": 0, "log_every": 1, "warmup_steps": 0, "threads": 1, "betas": [0.9, 0.999],
                      "weight_decay": 0.0, "device": "cpu"},
            "lora": {"rank": 2, "targets": "attention"},
            "cache_latents": True, "sample_images": 1, "sample_steps": 1}
    return load_config(DiffusionExperiment, data, [f"{k}={v}" for k, v in overrides.items()])


def latest_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "model.safetensors"))


def test_a_lora_run_trains_the_new_rows_only_saves_them_and_resumes_exactly(tmp_path, capsys):
    folder = pink_folder(tmp_path / "pink")
    base = load_file(f"{BASE}/model.safetensors")[EMBEDDING_KEY].float()
    straight = DiffusionTrainer(experiment(folder, tmp_path / "a"))
    straight.run()
    # auto: words seen at least twice that the base lacks; "mauve" (6 times) and "pink" (3), most frequent first
    assert straight.exp.new_words == ["mauve", "pink"]
    weights = latest_weights(tmp_path / "a")[EMBEDDING_KEY]
    assert weights.shape == (len(base) + 2, base.shape[1]) and torch.equal(weights[:len(base)], base)
    mean = base[4:].mean(0)
    assert not torch.allclose(weights[-1], mean) and not torch.allclose(weights[-2], mean)  # trained
    model = load_latent_diffusion(tmp_path / "a")  # what generate loads: the grown vocabulary from the config
    ids, _ = model.cond_stage_model.transformer.tokenize("a pink shirt on the left")
    assert model.cond_stage_model.transformer.tokenizer.unk_token_id not in ids[0].tolist()
    assert model.config.conditioner.text.vocab[-2:] == ["mauve", "pink"]
    assert main(["generate", "--model", str(tmp_path / "a"), "a pink shirt on the left", "--steps", "1",
                 "-o", str(tmp_path / "g.png")]) == 0

    DiffusionTrainer(experiment(folder, tmp_path / "b", **{"train.steps": "2"})).run()
    DiffusionTrainer(experiment(folder, tmp_path / "b"), resume=tmp_path / "b").run()
    a, b = latest_weights(tmp_path / "a"), latest_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_fine_tune_adds_listed_words_and_resumes_exactly(tmp_path):
    folder = pink_folder(tmp_path / "pink")
    base = load_file(f"{BASE}/model.safetensors")[EMBEDDING_KEY].float()
    full = {"lora.rank": "0", "new_words": "[Pink, red]", "new_words_init": "red", "text_encoder": "frozen"}
    DiffusionTrainer(experiment(folder, tmp_path / "a", **full)).run()
    weights = latest_weights(tmp_path / "a")[EMBEDDING_KEY]
    red = load_latent_diffusion(BASE).cond_stage_model.transformer.tokenizer.ids["red"]
    assert weights.shape[0] == len(base) + 1 and torch.equal(weights[:len(base)], base)  # frozen: new row only
    assert not torch.equal(weights[-1], base[red])
    DiffusionTrainer(experiment(folder, tmp_path / "b", **full, **{"train.steps": "2"})).run()
    assert main(["train", "--resume", str(tmp_path / "b"), "train.steps=3"]) == 0  # the run's own config
    a, b = latest_weights(tmp_path / "a"), latest_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, config = read_checkpoint(tmp_path / "b")  # "red" was known: only "pink" was added, and is recorded
    assert config["new_words"] == ["pink"]
    assert load_latent_diffusion(tmp_path / "b").config.conditioner.text.vocab[-2:] == ["coat", "pink"]


def test_new_words_refusals_are_one_clear_line(tmp_path):
    folder = pink_folder(tmp_path / "pink")
    with pytest.raises(ConfigError, match="new_words grows a fine-tuned model's vocabulary"):
        experiment(folder, tmp_path / "x", init_from="", **{"lora.rank": "0"})
    with pytest.raises(ConfigError, match="'light pink' is not one word"):
        DiffusionTrainer(experiment(folder, tmp_path / "y", new_words="[light pink]")).run()
    with pytest.raises(ConfigError, match="train.weight_decay: 0"):
        DiffusionTrainer(experiment(folder, tmp_path / "z", **{"train.weight_decay": "0.01"})).run()


def test_pink_renders_for_new_data_and_the_checker_tells_it_from_every_old_colour():
    scenes = FashionScenes("test", image_size=32, length=60, seed=3)
    raw, _ = _load_fashion_mnist(FASHION_MNIST_DIR, "test")
    drawn = [scenes.scene(i) for i in range(len(scenes))]
    old = torch.stack([scenes[i]["image"] for i in range(len(scenes))])
    assert torch.equal(old[0], render_scene([raw[r] for r in drawn[0][1]], drawn[0][0], scenes.layout)["image"])
    pink = [[SceneAttribute(a.cls, "pink", a.position) for a in attrs] for attrs, _ in drawn]
    pink_images = torch.stack([render_scene([raw[r] for r in rows], p, scenes.layout)["image"]
                               for (_, rows), p in zip(drawn, pink, strict=True)])
    classifier = FashionClassifier()  # the colour check does not use it
    aware = PromptChecker(classifier, CheckerConfig(new_colours=("pink",)))
    plain = PromptChecker(classifier)
    assert prompt_accuracy(pink_images, pink, aware)["colour_accuracy"] == 1.0
    assert prompt_accuracy(old, [a for a, _ in drawn], aware)["colour_accuracy"] == 1.0  # every old colour too
    assert prompt_accuracy(old, [a for a, _ in drawn], plain)["colour_accuracy"] == 1.0
    with pytest.raises(ValueError, match="'pink'.*colours: red,"):  # the default palette has no pink: refused
        prompt_accuracy(pink_images, pink, plain)
    with pytest.raises(ValueError, match="new_colours must be among pink"):
        PromptChecker(classifier, CheckerConfig(new_colours=("mauve",)))
