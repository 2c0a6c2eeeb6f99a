"""Tests for latentdiff.data.scenes (captioned Fashion-MNIST scenes) and latentdiff.eval.prompt_accuracy."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from latentdiff.data import DataConfig, build_dataset
from latentdiff.data.datasets import FASHION_MNIST_DIR, _load_fashion_mnist
from latentdiff.data.scenes import (
    CLASS_NAMES,
    COLOUR_NAMES,
    COLOURS,
    MASK_THRESHOLD,
    POSITIONS,
    FashionScenes,
    SceneAttribute,
    SceneLayout,
    caption_for,
    decode_attributes,
    encode_attributes,
    heldout_pairs,
    item_alpha,
    render_scene,
)
from latentdiff.eval.prompt_accuracy import (
    CheckerConfig,
    ClassifierConfig,
    FashionClassifier,
    PromptChecker,
    load_classifier,
    prompt_accuracy,
    train_classifier,
)

pytestmark = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist is not installed",
)

CAPTION_ITEM = re.compile(
    r"^an? (?P<colour>\w+) (?P<cls>[\w-]+)(?: (?:on the|at the) (?P<position>left|right|top|bottom))?$"
)
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "left"}


def _parse_caption(caption: str) -> list[SceneAttribute]:
    out = []
    for part in caption.split(" and "):
        m = CAPTION_ITEM.match(part)
        assert m, f"caption part {part!r} does not parse"
        out.append(SceneAttribute(m["cls"], m["colour"], m["position"] or "center"))
    return out


@pytest.fixture(scope="module")
def test_scenes() -> FashionScenes:
    return FashionScenes("test", length=2000, seed=3)


@pytest.fixture(scope="module")
def classifier() -> FashionClassifier:
    # A deliberately small, quickly trained classifier (~10 s on one thread): the checker's tests compare
    # against this classifier's own accuracy, so they do not need a good one.
    model, _ = train_classifier(None, steps=400, seed=0, threads=1, batch_size=64,
                                config=ClassifierConfig((8, 16, 32), 64, 0.1), eval_sizes=(16,), eval_limit=2000)
    return model


# ---------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------


def test_item_is_a_pure_function_of_seed_split_and_index() -> None:
    a = FashionScenes("train", length=100, seed=7)
    b = FashionScenes("train", length=100, seed=7)
    _ = b[42], b[3]  # other items read first, in another order, must not matter
    x, y = a[5], b[5]
    assert x.keys() == y.keys()
    for key in x:
        if isinstance(x[key], torch.Tensor):
            assert torch.equal(x[key], y[key]), key
        else:
            assert x[key] == y[key], key
    other_index = a[6]
    other_seed = FashionScenes("train", length=100, seed=8)[5]
    other_split = FashionScenes("test", length=100, seed=7)[5]
    for other in (other_index, other_seed, other_split):
        assert not torch.equal(other["image"], x["image"])
    captions = {a[i]["caption"] for i in range(40)}
    assert len(captions) > 30


def test_captions_match_attributes(test_scenes: FashionScenes) -> None:
    seen_positions, counts, first_mentioned = set(), set(), set()
    for i in range(300):
        item = test_scenes[i]
        attrs = decode_attributes(item["attributes"])
        assert item["num_items"] == len(attrs) in (1, 2)
        assert item["caption"] == caption_for(attrs)
        assert _parse_caption(item["caption"]) == attrs
        seen_positions.update(a.position for a in attrs)
        counts.add(len(attrs))
        if len(attrs) == 2:
            assert {a.position for a in attrs} in ({"left", "right"}, {"top", "bottom"})
            first_mentioned.add(attrs[0].position)
    assert seen_positions == set(POSITIONS)
    assert counts == {1, 2}
    assert first_mentioned == {"left", "right", "top", "bottom"}  # mention order is not the layout order
    assert caption_for([SceneAttribute("bag", "orange", "center")]) == "an orange bag"
    assert caption_for([SceneAttribute("sneaker", "red", "left"), SceneAttribute("bag", "blue", "right")]) == (
        "a red sneaker on the left and a blue bag on the right")
    encoded = encode_attributes([SceneAttribute("boot", "white", "top")])
    assert encoded.tolist() == [[9, 7, 3], [-1, -1, -1]]
    assert decode_attributes(encoded) == [("boot", "white", "top")]


def test_class_map_instance_masks_and_pixels_agree(test_scenes: FashionScenes) -> None:
    palette = torch.tensor(list(COLOURS.values()))
    for i in range(100):
        item = test_scenes[i]
        attrs = decode_attributes(item["attributes"])
        masks, class_map, image = item["instance_masks"], item["class_map"], item["image"]
        assert masks.dtype == torch.bool and class_map.dtype == torch.long
        assert masks.sum(0).max() <= 1  # disjoint
        expected = torch.zeros_like(class_map)
        for k, a in enumerate(attrs):
            assert masks[k].any()
            expected[masks[k]] = 1 + CLASS_NAMES.index(a.cls)
            inside_box = test_scenes.layout.box_mask(a.position)
            assert not (masks[k] & ~inside_box).any()
            # Every item pixel has its attribute's colour: pixel / brightest channel is the palette entry.
            rgb = (image[:, masks[k]] + 1) / 2
            ratio = rgb / rgb.amax(0, keepdim=True)
            assert torch.allclose(ratio, palette[COLOUR_NAMES.index(a.colour)][:, None], atol=1e-4)
        assert not masks[len(attrs):].any()
        assert torch.equal(class_map, expected)
        assert class_map.max() <= len(CLASS_NAMES)
        brightness = (image + 1).amax(0) / 2
        assert brightness[~masks.any(0)].max() < MASK_THRESHOLD + 1e-6  # background is black, but for edges


def test_heldout_pairs_never_in_train_always_in_test_heldout() -> None:
    pairs = heldout_pairs(0)
    assert pairs == heldout_pairs(0) and pairs != heldout_pairs(1)
    assert len(pairs) == 8  # 10% of the 80 (colour, class) pairs
    assert len({c for c, _ in pairs}) == 8 and len({k for _, k in pairs}) == 8
    held = set(pairs)
    train = FashionScenes("train", seed=0)
    assert list(train.heldout) == list(pairs)
    seen_train = set()
    for i in range(4000):
        attrs, _ = train.scene(i)
        seen_train.update((a.colour, a.cls) for a in attrs)
    assert not seen_train & held
    assert len(seen_train) == 72  # and every seen pair does appear
    test = FashionScenes("test", seed=0)
    for i in range(1000):
        assert not {(a.colour, a.cls) for a in test.scene(i)[0]} & held
    heldout = FashionScenes("test_heldout", seed=0)
    found = set()
    for i in range(1000):
        attrs, _ = heldout.scene(i)
        hits = {(a.colour, a.cls) for a in attrs} & held
        assert hits
        found |= hits
    assert found == held
    item = heldout[0]
    flags = [(a.colour, a.cls) in held for a in decode_attributes(item["attributes"])]
    assert item["is_heldout"].tolist()[: len(flags)] == flags and any(flags)


@pytest.mark.parametrize("split, source", [("train", "train"), ("test", "test"), ("test_heldout", "test")])
def test_items_come_from_the_right_fashion_mnist_split(split: str, source: str) -> None:
    ds = FashionScenes(split, length=50, seed=1)
    assert ds.source_split == source
    images, labels = _load_fashion_mnist(FASHION_MNIST_DIR, source)
    for i in range(0, 50, 5):
        item = ds[i]
        attrs = decode_attributes(item["attributes"])
        rows = item["source_index"].tolist()[: len(attrs)]
        assert all(labels[r] == CLASS_NAMES.index(a.cls) for r, a in zip(rows, attrs, strict=True))
        redrawn = render_scene([images[r] for r in rows], attrs, ds.layout)
        assert torch.equal(redrawn["image"], item["image"])
    # Train rows reach past the 10k test file, so they cannot be test indices.
    train = FashionScenes("train", seed=1)
    assert max(max(train.scene(i)[1]) for i in range(200)) >= 10000


@pytest.mark.parametrize("size", [32, 64])
def test_canvas_sizes(size: int) -> None:
    ds = FashionScenes("test", image_size=size, length=20)
    assert ds.layout.item_size == size // 2
    for i in range(20):
        item = ds[i]
        assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert item["class_map"].shape == (size, size)
        assert item["instance_masks"].shape == (2, size, size)
        union = torch.zeros(size, size, dtype=torch.bool)
        for a in decode_attributes(item["attributes"]):
            union |= ds.layout.box_mask(a.position)
        assert (item["image"][:, ~union] == -1).all()  # nothing is drawn outside the named boxes
    layout = SceneLayout(size)
    assert layout.box("left")[1] == 0 and layout.box("right")[1] == size // 2
    assert not (layout.box_mask("left") & layout.box_mask("right")).any()
    assert not (layout.box_mask("top") & layout.box_mask("bottom")).any()
    with pytest.raises(ValueError):
        SceneLayout(size, item_size=size // 2 + 1)


def test_build_dataset_and_default_collate() -> None:
    ds = build_dataset(DataConfig(name="fmnist-scenes", channels=3, image_size=32, limit=16, seed=2), "test_heldout")
    assert isinstance(ds, FashionScenes) and len(ds) == 16 and ds.split == "test_heldout" and ds.seed == 2
    with pytest.raises(ValueError, match="channels"):
        build_dataset(DataConfig(name="fmnist_scenes", channels=1), "train")
    with pytest.raises(ValueError, match="split"):
        build_dataset(DataConfig(name="fmnist_scenes", channels=3), "valid")
    batch = next(iter(DataLoader(ds, batch_size=8)))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["attributes"].shape == (8, 2, 3)
    assert len(batch["caption"]) == 8 and batch["label"].tolist() == [-1] * 8
    assert set(batch["num_items"].tolist()) == {1, 2}
    decoded = decode_attributes(batch["attributes"])
    assert [caption_for(a) for a in decoded] == batch["caption"]


def test_item_alpha_peaks_at_one() -> None:
    images, _ = _load_fashion_mnist(FASHION_MNIST_DIR, "test")
    for size in (16, 28, 32):
        alpha = item_alpha(images[0], size)
        assert alpha.shape == (size, size) and alpha.max() == 1.0 and alpha.min() >= 0.0


# ---------------------------------------------------------------------------------------------------------
# The classifier and the prompt checker
# ---------------------------------------------------------------------------------------------------------


def _real_batch(ds: FashionScenes, indices: range) -> tuple[torch.Tensor, list[list[SceneAttribute]], list]:
    images, attrs, sources = [], [], []
    for i in indices:
        a, s = ds.scene(i)
        images.append(ds[i]["image"])
        attrs.append(a)
        sources.append(s)
    return torch.stack(images), attrs, sources


def test_classifier_saves_and_loads(classifier: FashionClassifier, tmp_path: Path) -> None:
    assert classifier.metadata["test_accuracy_at_item_size"]["16"] > 0.7
    path = tmp_path / "clf.safetensors"
    model, meta = train_classifier(path, steps=2, seed=0, threads=1, batch_size=8,
                                   config=ClassifierConfig((4, 4, 4), 8, 0.0), eval_sizes=(), eval_limit=100)
    assert path.is_file() and (tmp_path / "clf.safetensors.json").is_file()
    loaded = load_classifier(path)
    assert loaded.metadata == meta and loaded.config == model.config
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))


def test_checker_passes_real_scenes(classifier: FashionClassifier, test_scenes: FashionScenes) -> None:
    checker = PromptChecker(classifier)
    images, attrs, sources = _real_batch(test_scenes, range(300))
    result = prompt_accuracy(images, attrs, checker)
    assert result["num_prompts"] == 300 and result["num_attributes"] > 400
    assert result["colour_accuracy"] == 1.0
    assert result["position_accuracy"] == 1.0
    # The class check is exactly the classifier on the item: compare with the classifier on the sources.
    raw, _ = _load_fashion_mnist(FASHION_MNIST_DIR, "test")
    items = torch.stack([item_alpha(raw[r], 16) for src in sources for r in src])[:, None]
    with torch.no_grad():
        direct = classifier(torch.nn.functional.interpolate(items, size=(28, 28), mode="bilinear",
                                                            antialias=True, align_corners=False)).argmax(1)
    truth = torch.tensor([CLASS_NAMES.index(a.cls) for row in attrs for a in row])
    direct_accuracy = (direct == truth).float().mean().item()
    assert abs(result["class_accuracy"] - direct_accuracy) < 0.01
    assert abs(result["class_accuracy"] - classifier.metadata["test_accuracy_at_item_size"]["16"]) < 0.08
    assert result["prompt_accuracy"] > 0.6
    # Collated dataset batches go in as they are, at 64 px too.
    ds64 = FashionScenes("test", image_size=64, length=64, seed=3)
    batch = next(iter(DataLoader(ds64, batch_size=64)))
    result64 = prompt_accuracy(batch["image"], batch["attributes"], checker)
    assert result64["colour_accuracy"] == 1.0 and result64["position_accuracy"] == 1.0
    assert result64["class_accuracy"] > 0.6


def test_checker_fails_corrupted_scenes(classifier: FashionClassifier, test_scenes: FashionScenes) -> None:
    checker = PromptChecker(classifier)
    raw, labels = _load_fashion_mnist(FASHION_MNIST_DIR, "test")
    layout = test_scenes.layout
    scenes = [test_scenes.scene(i) for i in range(200)]

    def run(drawn: list[list[SceneAttribute]], sources: list[list[int]], claimed: list[list[SceneAttribute]]):
        images = torch.stack([render_scene([raw[r] for r in src], d, layout)["image"]
                              for d, src in zip(drawn, sources, strict=True)])
        return prompt_accuracy(images, claimed, checker)

    attrs = [a for a, _ in scenes]
    sources = [s for _, s in scenes]
    # Wrong colour: every item drawn in another colour.
    recoloured = [[a._replace(colour=COLOUR_NAMES[(COLOUR_NAMES.index(a.colour) + 3) % 8]) for a in row]
                  for row in attrs]
    r = run(recoloured, sources, attrs)
    assert r["colour_accuracy"] == 0.0 and r["prompt_accuracy"] == 0.0 and r["position_accuracy"] == 1.0

    # Wrong class: each item replaced by a real item of a different class (t-shirt <-> sandal, bag <-> dress..).
    other_rows = [[int(np.flatnonzero(labels == (CLASS_NAMES.index(a.cls) + 5) % 10)[i]) for a in row]
                  for i, row in enumerate(attrs)]
    r = run(attrs, other_rows, attrs)
    assert r["class_accuracy"] < 0.15 and r["colour_accuracy"] == 1.0 and r["position_accuracy"] == 1.0

    # Swapped positions, two items with different colours: each box shows the other item's colour.
    pairs = [(a, s) for a, s in scenes if len(a) == 2 and a[0].colour != a[1].colour]
    swapped = [[x._replace(position=y.position) for x, y in zip(a, a[::-1], strict=True)] for a, _ in pairs]
    r = run(swapped, [s for _, s in pairs], [a for a, _ in pairs])
    assert r["colour_accuracy"] == 0.0 and r["prompt_accuracy"] == 0.0

    # One item in the wrong place (left <-> right, top <-> bottom, center -> left, left -> center).
    singles = [(a, s) for a, s in scenes if len(a) == 1]
    moved = [[a[0]._replace(position=OPPOSITE[a[0].position])] for a, _ in singles]
    r = run(moved, [s for _, s in singles], [a for a, _ in singles])
    assert r["position_accuracy"] == 0.0 and r["prompt_accuracy"] == 0.0
    lefts = [(a, s) for a, s in singles if a[0].position == "left"]
    r = run([[a[0]._replace(position="center")] for a, _ in lefts], [s for _, s in lefts], [a for a, _ in lefts])
    assert r["position_accuracy"] == 0.0

    # The item drawn in its slot AND in the opposite one: the rest of a one-item scene must stay empty.
    sided = [(a, s) for a, s in singles if a[0].position != "center"]
    doubled = [[a[0], a[0]._replace(position=OPPOSITE[a[0].position])] for a, _ in sided]
    r = run(doubled, [s * 2 for _, s in sided], [a for a, _ in sided])
    assert r["position_accuracy"] == 0.0

    # Nothing drawn at all.
    r = prompt_accuracy(torch.full((10, 3, 32, 32), -1.0), attrs[:10], checker)
    assert all(r[k] == 0.0 for k in ("class_accuracy", "colour_accuracy", "position_accuracy", "prompt_accuracy"))


def test_checker_inputs_and_thresholds(classifier: FashionClassifier) -> None:
    checker = PromptChecker(classifier, CheckerConfig(min_fill=0.02))
    ds = FashionScenes("test", length=4, seed=0)
    item = ds[0]
    by_name = decode_attributes(item["attributes"])
    by_index = [(CLASS_NAMES.index(a.cls), COLOUR_NAMES.index(a.colour), POSITIONS.index(a.position))
                for a in by_name]
    [checks_a], [checks_b] = (checker.check(item["image"][None], [x]) for x in (by_name, by_index))
    assert [(c.colour_ok, c.position_ok, c.predicted_class) for c in checks_a] == [
        (c.colour_ok, c.position_ok, c.predicted_class) for c in checks_b]
    assert all(c.fill >= 0.02 and c.stray == 0.0 for c in checks_a)
    with pytest.raises(ValueError):
        checker.check(item["image"][None], [[("hat", "red", "left")]])
    with pytest.raises(ValueError):
        checker.check(item["image"][None, :1], [by_name])
