"""DreamBooth training (``task: dreambooth``) on the tiny SD model: the base generates the missing class images (kept
when there, topped up when too few), the logged loss is instance + weight * prior, a prior weight of 0 trains exactly
as a plain fine-tune on the instance images, LoRA works (adapter files beside the checkpoint), resume is exact, and
bad set-ups are one clear error."""

from __future__ import annotations

import csv

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_textual_inversion import tiny_sd_base, write_images

from latentdiff.cli import main
from latentdiff.config import load_config
from latentdiff.formats.lora import KOHYA_FILE, PEFT_FILE
from latentdiff.io.checkpoint import read_checkpoint
from latentdiff.train.diffusion import DiffusionExperiment, DiffusionTrainer
from latentdiff.train.dreambooth import DreamBoothExperiment, DreamBoothTrainer

INSTANCE_PROMPT = "a photo of sks toy"
TRAIN = {"steps": 3, "batch_size": 2, "lr": 1e-3, "ckpt_every": 0, "sample_every": 0, "log_every": 1,
         "warmup_steps": 0, "threads": 1, "betas": [0.9, 0.999]}


def dreambooth(base, root, out_dir, **overrides: str) -> DreamBoothExperiment:
    config = {"task": "dreambooth", "init_from": str(base),
              "dreambooth": {"instance_prompt": INSTANCE_PROMPT, "class_prompt": "a photo of toy",
                             "class_images": str(root / "class"), "num_class_images": 3, "prior_loss_weight": 0.5},
              "data": {"path": str(root / "instance"), "image_size": 32, "channels": 3, "random_flip": False},
              "train": dict(TRAIN, out_dir=str(out_dir)), "sample_images": 2, "sample_steps": 2}
    return load_config(DreamBoothExperiment, config, [f"{k}={v}" for k, v in overrides.items()])


def log_rows(run) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny SD base, 3 uncaptioned instance images, and a LoRA DreamBooth run that generates the class images."""
    root = tmp_path_factory.mktemp("dreambooth")
    base = tiny_sd_base(root)
    write_images(root / "instance", 3, seed=1)
    lora = {"lora.rank": "4", "lora.text_encoder": "true"}
    trainer = DreamBoothTrainer(dreambooth(base, root, root / "lora", **lora))
    trainer.run()
    return base, root, trainer


def test_class_images_are_generated_and_the_prior_term_is_weighted(lora_run) -> None:
    base, root, trainer = lora_run
    files = sorted(p.name for p in (root / "class").iterdir())
    assert trainer.generated == 3 and files == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert Image.open(root / "class" / files[0]).size == (32, 32)
    rows = log_rows(root / "lora")
    assert len(rows) == 3
    for row in rows:
        total, instance, prior = (float(row[k]) for k in ("loss", "loss_instance", "loss_prior"))
        assert prior > 0 and total == pytest.approx(instance + 0.5 * prior, rel=1e-5)
    checkpoint = root / "lora" / "checkpoints" / "step_0000003"
    assert (checkpoint / KOHYA_FILE).is_file() and (checkpoint / PEFT_FILE).is_file()
    assert any(k.startswith("lora_te_") for k in load_file(str(checkpoint / KOHYA_FILE)))
    # Too few class images: only the missing ones are made, the others are kept as they are.
    before = {name: (root / "class" / name).read_bytes() for name in files}
    more = DreamBoothTrainer(dreambooth(base, root, root / "more", **{"dreambooth.num_class_images": "5",
                                                                      "train.steps": "1"}))
    more.run()
    assert more.generated == 2 and len(list((root / "class").glob("class_*.png"))) == 5
    assert all((root / "class" / name).read_bytes() == data for name, data in before.items())


def test_zero_prior_weight_equals_plain_fine_tuning(lora_run, tmp_path) -> None:
    base, root, _ = lora_run
    folder = tmp_path / "instance"  # the instance images with DreamBooth's captions written out, for the plain run
    folder.mkdir()
    for image in (root / "instance").glob("*.png"):
        (folder / image.name).write_bytes(image.read_bytes())
        (folder / image.name).with_suffix(".txt").write_text(INSTANCE_PROMPT)
    db = dreambooth(base, root, tmp_path / "db", **{"dreambooth.prior_loss_weight": "0", "data.path": str(folder)})
    DreamBoothTrainer(db).run()
    plain = load_config(DiffusionExperiment, {
        "task": "diffusion", "init_from": str(base), "cache_latents": False, "sample_images": 2, "sample_steps": 2,
        "data": {"path": str(folder), "image_size": 32, "channels": 3, "random_flip": False},
        "train": dict(TRAIN, out_dir=str(tmp_path / "plain"))})
    DiffusionTrainer(plain).run()
    a, _ = read_checkpoint(tmp_path / "db")
    b, _ = read_checkpoint(tmp_path / "plain")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [float(r["loss"]) for r in log_rows(tmp_path / "db")] == [float(r["loss"]) for r in
                                                                      log_rows(tmp_path / "plain")]


def test_full_fine_tuning_resumes_exactly(lora_run, tmp_path) -> None:
    base, root, _ = lora_run
    DreamBoothTrainer(dreambooth(base, root, tmp_path / "a")).run()
    DreamBoothTrainer(dreambooth(base, root, tmp_path / "b", **{"train.steps": "2"})).run()
    assert main(["train", "--resume", str(tmp_path / "b"), "train.steps=3"]) == 0
    a, _ = read_checkpoint(tmp_path / "a")
    b, _ = read_checkpoint(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss_prior"] for r in log_rows(tmp_path / "a")] == [r["loss_prior"] for r in log_rows(tmp_path / "b")]


def test_bad_set_ups_are_one_clear_error(lora_run, tmp_path) -> None:
    base, root, _ = lora_run
    with pytest.raises(ValueError, match="set data.path"):
        dreambooth(base, root, tmp_path / "a", **{"data.path": ""})
    with pytest.raises(ValueError, match="cache_latents: false"):
        dreambooth(base, root, tmp_path / "a", cache_latents="true")
    with pytest.raises(ValueError, match="instance_prompt and dreambooth.class_prompt"):
        dreambooth(base, root, tmp_path / "a", **{"dreambooth.class_prompt": ""})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        DreamBoothTrainer(dreambooth(base, root, tmp_path / "a", **{"data.path": str(tmp_path / "empty")})).run()
    assert not (tmp_path / "a").exists()
