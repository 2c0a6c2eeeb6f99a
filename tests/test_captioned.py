"""Tests for latentdiff.data.captioned: captioned folders in kohya's and Hugging Face's conventions, skips, errors,
caption augmentation, and an end-to-end text-to-image run on a user's folder (with and without buckets)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from latentdiff.cli import main
from latentdiff.config import ConfigError, load_config, read_yaml
from latentdiff.data import DataConfig, build_dataset
from latentdiff.data.captioned import CaptionedFolderDataset, CaptionedFolderError, shuffle_tags
from latentdiff.formats.native import load_latent_diffusion
from latentdiff.train.diffusion import DiffusionExperiment

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230), "yellow": (230, 220, 30)}


def write_image(path: Path, colour: str, size: tuple[int, int] = (16, 16)) -> Path:
    """A tiny PNG (``size`` is PIL's (width, height)): the named colour with a white square in its top-left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, COLOURS[colour])
    img.paste((255, 255, 255), (0, 0, size[0] // 4, size[1] // 4))
    img.save(path)
    return path


def make_captioned_folder(root: Path, count: int = 8, sizes: tuple[tuple[int, int], ...] = ((16, 16),)) -> Path:
    """A user's folder in kohya's layout: ``count`` images with a caption file each (some in a sub-folder), one
    corrupt image with a caption, one image without a caption."""
    names = list(COLOURS)
    for i in range(count):
        colour = names[i % len(names)]
        folder = root / "more" if i % 3 == 2 else root
        image = write_image(folder / f"img{i:02d}.png", colour, sizes[i % len(sizes)])
        image.with_suffix(".txt").write_text(f"a {colour} square, picture {i}\n")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "broken.txt").write_text("a broken picture")
    write_image(root / "uncaptioned.png", "red")
    return root


def test_kohya_folder_reads_captions_recursively_and_skips_with_one_log_line(tmp_path, caplog):
    root = make_captioned_folder(tmp_path / "photos")
    with caplog.at_level(logging.INFO, logger="latentdiff.data.captioned"):
        data = build_dataset(DataConfig(path=str(root), channels=3, image_size=16), "train")
    assert isinstance(data, CaptionedFolderDataset) and data.num_skipped == 2
    assert len(data) == 8 and {p.parent.name for p in data.files} == {"photos", "more"}
    assert data.caption(0) == "a red square, picture 0"  # img00.png, the first by relative path
    lines = [r.getMessage() for r in caplog.records if "captioned folder" in r.getMessage()]
    assert len(lines) == 1
    assert "skipped 1 unreadable (broken.png) and 1 without a caption (uncaptioned.png)" in lines[0]
    item = data[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["caption"] == "a red square, picture 0" and item["label"] == -1
    assert item["original_size"].tolist() == [16, 16] and item["crop_coords_top_left"].tolist() == [0, 0]
    # data.path selects the folder whatever data.name says, and names it in logs
    assert DataConfig(name="fmnist_scenes", path=str(root)).name == str(root)


def test_metadata_jsonl_and_csv_relative_to_their_folder_and_which_wins(tmp_path, caplog):
    root = tmp_path / "hf"
    for name, colour in (("a.png", "red"), ("sub/b.png", "green"), ("sub/c.png", "blue"), ("d.png", "yellow")):
        write_image(root / name, colour)
    (root / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "from jsonl"}) + "\n"
        + json.dumps({"file_name": "sub/b.png", "text": "b from the top"}) + "\n"
        + json.dumps({"file_name": "gone.png", "text": "no such file"}) + "\n")
    (root / "metadata.csv").write_text('file_name,text\na.png,from csv\nd.png,"d, from csv"\n')
    (root / "sub" / "metadata.csv").write_text("file_name,text\nb.png,b from the deeper file\nc.png,c\n")
    (root / "a.txt").write_text("from the txt file")  # the metadata wins over a .txt, with a warning
    with caplog.at_level(logging.WARNING, logger="latentdiff.data.captioned"):
        data = CaptionedFolderDataset(DataConfig(path=str(root), channels=3, image_size=16), "train")
    captions = {p.relative_to(root).as_posix(): data.caption(i) for i, p in enumerate(data.files)}
    assert captions == {"a.png": "from jsonl", "d.png": "d, from csv", "sub/b.png": "b from the deeper file",
                        "sub/c.png": "c"}
    text = caplog.text
    assert "both metadata.jsonl and metadata.csv" in text
    assert "1 metadata rows name no image file" in text and "gone.png" in text
    assert "1 captioned both by metadata and .txt differently" in text


@pytest.mark.parametrize("content, where", [
    ('{"file_name": "a.png", "text": "ok"}\n{not json\n', "metadata.jsonl:2"),
    ('{"file_name": "a.png"}\n', "metadata.jsonl:1"),
])
def test_a_bad_metadata_file_is_one_error_naming_file_and_line(tmp_path, content, where):
    write_image(tmp_path / "a.png", "red")
    (tmp_path / "metadata.jsonl").write_text(content)
    with pytest.raises(CaptionedFolderError, match=where):
        CaptionedFolderDataset(DataConfig(path=str(tmp_path), channels=3, image_size=16), "train")


def test_empty_results_and_wrong_paths_are_one_clear_error(tmp_path, capsys, scenes_first_stage):
    write_image(tmp_path / "only" / "a.png", "red")
    with pytest.raises(CaptionedFolderError, match=r"no captioned images .* 1 image files .* 1 without a caption"
                                                   r".*IMAGE\.txt.*metadata\.jsonl"):
        CaptionedFolderDataset(DataConfig(path=str(tmp_path / "only"), channels=3, image_size=16), "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(DataConfig(path=str(tmp_path / "nowhere")), "train")
    with pytest.raises(ValueError, match="apply to captioned folders"):
        build_dataset(DataConfig(name="mnist5k", shuffle_tags=True), "train")
    with pytest.raises(ValueError, match="give one of them"):
        DataConfig(path=str(tmp_path), shards=str(tmp_path / "data-{000000..000001}.tar"))
    # through the CLI: one line, no traceback
    assert main(["train", "configs/ldm-scenes-txt2img.yaml", f"data.path={tmp_path / 'only'}",
                 f"train.out_dir={tmp_path / 'run'}", f"model.first_stage={scenes_first_stage}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("latentdiff: error: no captioned images")


def test_test_split_is_every_20th_image_of_the_whole_listing(tmp_path):
    make_captioned_folder(tmp_path, count=40)
    cfg = DataConfig(path=str(tmp_path), channels=3, image_size=16)
    train, test = CaptionedFolderDataset(cfg, "train"), CaptionedFolderDataset(cfg, "test")
    # 42 files in the listing (broken.png, img00..39, more/..., uncaptioned.png): positions 20 and 40 are test
    assert len(train) + len(test) == 40 and len(test) == 2 and not set(train.files) & set(test.files)


def test_shuffle_tags_keeps_the_first_tokens_in_place():
    caption = "sks dog, sitting, grass,  sunny ,, photo"
    got = shuffle_tags(caption, keep_tokens=1, generator=torch.Generator().manual_seed(0))
    assert got == "sks dog, sitting, grass, photo, sunny"  # torch.randperm(4, seed 0) = [0, 1, 3, 2]
    assert shuffle_tags(caption, keep_tokens=9) == "sks dog, sitting, grass, sunny, photo"
    many = {shuffle_tags("a, b, c, d", 2, torch.Generator().manual_seed(s)) for s in range(20)}
    assert many == {"a, b, c, d", "a, b, d, c"}


def test_caption_dropout_and_tag_shuffling_apply_to_the_train_split_only(tmp_path):
    make_captioned_folder(tmp_path, count=4)
    cfg = DataConfig(path=str(tmp_path), channels=3, image_size=16, caption_dropout=0.5, shuffle_tags=True)
    train, test = CaptionedFolderDataset(cfg, "train"), CaptionedFolderDataset(cfg, "test")
    torch.manual_seed(0)
    seen = {train[0]["caption"] for _ in range(40)}
    assert seen == {"", "a red square, picture 0", "picture 0, a red square"}
    assert {test[0]["caption"] for _ in range(10)} == {"a red square, picture 0"}
    assert train.caption(0) == "a red square, picture 0"  # the vocabulary reads captions as written


def test_crops_record_sdxl_micro_conditioning(tmp_path):
    write_image(tmp_path / "wide.png", "red", (32, 16)).with_suffix(".txt").write_text("wide")
    centre = CaptionedFolderDataset(DataConfig(path=str(tmp_path), channels=3, image_size=8, resize="center_crop"),
                                    "train")[0]
    assert centre["image"].shape == (3, 8, 8)
    assert centre["original_size"].tolist() == [16, 32] and centre["crop_coords_top_left"].tolist() == [0, 4]
    random = CaptionedFolderDataset(DataConfig(path=str(tmp_path), channels=3, image_size=8, resize="center_crop",
                                               crop="random"), "train")
    torch.manual_seed(0)
    corners = {tuple(random[0]["crop_coords_top_left"].tolist()) for _ in range(30)}
    assert len(corners) > 3 and all(top == 0 and 0 <= left <= 8 for top, left in corners)
    with pytest.raises(ValueError, match="data.resize=center_crop or data.buckets=true"):
        DataConfig(path=str(tmp_path), crop="random")


def test_the_latent_cache_refuses_what_it_would_freeze():
    txt2img = read_yaml("configs/ldm-scenes-txt2img.yaml")
    base = load_config(DiffusionExperiment, txt2img, ["data.path=somewhere"])
    assert base.cache_latents and base.data.name == "somewhere"
    for overrides in (["data.caption_dropout=0.1"], ["data.shuffle_tags=true"],
                      ["data.crop=random", "data.resize=center_crop"]):
        with pytest.raises(ConfigError, match=r"cache_latents=false"):
            load_config(DiffusionExperiment, txt2img, ["data.path=somewhere", *overrides])
    # buckets are cached at each item's bucket size (train/latent_cache.py)
    load_config(DiffusionExperiment, txt2img, ["data.path=somewhere", "data.buckets=true", "data.bucket_step=8"])


def test_bucketed_train_items_fit_their_bucket_and_the_test_split_stays_square(tmp_path):
    make_captioned_folder(tmp_path, count=6, sizes=((32, 16), (16, 32), (20, 20)))
    cfg = DataConfig(path=str(tmp_path), channels=3, image_size=16, buckets=True, bucket_step=8)
    train = CaptionedFolderDataset(cfg, "train")
    assert train.bucket_sizes == [(32, 8), (24, 8), (16, 16), (8, 24), (8, 32)]
    for i in range(len(train)):
        h, w = train.target_size(i)
        item = train[i]
        assert item["image"].shape == (3, h, w)
        original = tuple(item["original_size"].tolist())
        assert {(16, 32): (8, 24), (32, 16): (24, 8), (20, 20): (16, 16)}[original] == (h, w)
    test = default_collate([CaptionedFolderDataset(cfg, "test")[i] for i in range(3)])
    assert test["image"].shape == (3, 3, 16, 16)


TINY = ["model.unet.model_channels=32", "model.unet.num_res_blocks=1", "model.schedule.num_timesteps=50",
        "data.image_size=16", "train.batch_size=2", "train.log_every=2", "train.ckpt_every=2",
        "train.sample_every=2", "train.warmup_steps=0", "train.threads=1", "train.time_limit_minutes=0",
        "sample_images=4", "sample_steps=2", "ema_decay=0.99", "train.device=cpu",
        "model.conditioner.text.width=32", "model.conditioner.text.layers=1", "model.conditioner.text.heads=2",
        "model.unet.context_dim=32"]


@pytest.mark.parametrize("extra", [[], ["cache_latents=false", "data.buckets=true", "data.bucket_step=8",
                                        "data.caption_dropout=0.2", "data.shuffle_tags=true", "data.random_flip=true"],
                                   ["data.buckets=true", "data.bucket_step=8"]],
                         ids=["cached", "buckets", "cached-buckets"])
def test_txt2img_trains_on_a_users_captioned_folder(tmp_path, scenes_first_stage, extra):
    folder = make_captioned_folder(tmp_path / "mine", count=12, sizes=((16, 16), (32, 16), (16, 32)))
    out = tmp_path / "run"
    assert main(["train", "configs/ldm-scenes-txt2img.yaml", *TINY, f"data.path={folder}", "train.steps=4",
                 f"train.out_dir={out}", f"model.first_stage={scenes_first_stage}", *extra]) == 0
    config = json.loads((out / "checkpoints" / "step_0000004" / "config.json").read_text())
    assert config["data"]["path"] == str(folder)
    vocab = config["model"]["conditioner"]["embedders"][0]["text"]["vocab"]
    assert {"red", "green", "blue", "yellow", "square"} <= set(vocab)
    # fewer than 20 images: the test split is the whole folder, its first 4 captions head the sample grid
    captions = (out / "samples" / "captions.txt").read_text().splitlines()
    assert captions == ["a red square, picture 0", "a green square, picture 1", "a yellow square, picture 3",
                        "a red square, picture 4"]  # img00, img01, img03, img04: img02 is in more/
    assert Image.open(out / "samples.png").size == (2 * 18 + 2, 2 * 18 + 2)
    model = load_latent_diffusion(out)
    images = model.sample(2, "ddim", 2, torch.Generator().manual_seed(0), cond={"caption": captions[:2]},
                          guidance_scale=2.0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
