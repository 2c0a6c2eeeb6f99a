"""Tests of the embedders one by one, the conditioner that runs their list, the compatibility reader of the flat
config, the old random stream, and a new embedder kind added without touching the conditioner."""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from latentdiff.conditioning.clip import CLIPTextConfig
from latentdiff.conditioning.compat import FlatConditionerConfig
from latentdiff.conditioning.conditioner import Conditioner, ConditionerConfig
from latentdiff.conditioning.embedders.base import Embedder, EmbedderConfig, Geometry
from latentdiff.conditioning.embedders.class_map_concat import ClassMapConcatConfig
from latentdiff.conditioning.embedders.class_map_tokens import ClassMapTokensConfig
from latentdiff.conditioning.embedders.clip_text import CLIPEncoderConfig
from latentdiff.conditioning.embedders.inpaint import InpaintConfig
from latentdiff.conditioning.embedders.label import LabelConfig
from latentdiff.conditioning.embedders.lowres import LowResConfig
from latentdiff.conditioning.embedders.minilm import MiniLMConfig
from latentdiff.conditioning.embedders.registry import EMBEDDERS, build_embedder
from latentdiff.conditioning.embedders.text_transformer import TextTransformerEmbedderConfig
from latentdiff.conditioning.text import TextTransformerConfig
from latentdiff.config import ConfigError, from_dict, load_config, read_yaml, to_dict
from latentdiff.diffusion.model import LatentDiffusion, LatentDiffusionConfig
from latentdiff.diffusion.unet import UNetConfig
from latentdiff.train.diffusion import DiffusionExperiment

GEOMETRY = Geometry(image_size=16, image_channels=3, latent_size=8, latent_channels=4)
VOCAB = ["a", "red", "blue", "bag", "boot", "on", "the", "left"]
TEXT = TextTransformerConfig(vocab=VOCAB, max_length=8, width=32, layers=1, heads=2)
TINY_CLIP = CLIPTextConfig(vocab_size=49408, context_length=12, width=32, layers=1, heads=2, mlp_width=64)


def identity_encode(x: torch.Tensor) -> torch.Tensor:
    # A stand-in first stage with f = 2 and 4 channels: average-pool, then repeat a channel.
    pooled = torch.nn.functional.avg_pool2d(x, 2)
    return torch.cat([pooled, pooled[:, :1]], dim=1)


def fake_batch(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"caption": ["a red bag on the left", "a blue boot", "", "the bag"][:n],
            "class_map": torch.randint(0, 11, (n, 16, 16), generator=g),
            "image": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1,
            "mask": (torch.rand(n, 1, 16, 16, generator=g) > 0.5).float(),
            "label": torch.arange(n) % 5}


# ---------------------------------------------------------------------------------------------------- one by one

# (config, the output's shape for 4 samples: tokens for crossattn, channels for concat, the vector for vector)
EMBEDDER_CASES = {
    "transformer": (TextTransformerEmbedderConfig(text=TEXT), (4, 8, 32)),
    "minilm": (MiniLMConfig(max_length=12), (4, 12, 384)),
    "clip": (CLIPEncoderConfig(model=TINY_CLIP), (4, 12, 32)),
    "class_map_concat": (ClassMapConcatConfig(num_classes=11), (4, 11, 8, 8)),
    "class_map_tokens": (ClassMapTokensConfig(num_classes=11, width=24), (4, 64, 24)),
    "lowres": (LowResConfig(size=16), (4, 12, 8, 8)),
    "inpaint": (InpaintConfig(), (4, 5, 8, 8)),
    "label": (LabelConfig(num_classes=5), (4,)),
}


def test_every_registered_kind_is_tested():
    assert set(EMBEDDER_CASES) == set(EMBEDDERS)


@pytest.mark.parametrize("kind", list(EMBEDDER_CASES))
def test_each_embedder_alone_shapes_and_unconditional_version(kind):
    config, shape = EMBEDDER_CASES[kind]
    torch.manual_seed(0)
    embedder = build_embedder(config, GEOMETRY)
    assert embedder.config.kind == kind and embedder.config.output == config.output
    prepared = embedder.prepare(fake_batch())
    assert set(prepared) <= set(embedder.keys) and prepared
    kept = embedder(prepared, torch.zeros(4, dtype=torch.bool), identity_encode)
    dropped = embedder(prepared, torch.ones(4, dtype=torch.bool), identity_encode)
    missing = embedder({}, torch.zeros(4, dtype=torch.bool), identity_encode)
    if config.output == "crossattn":
        (kept, kept_mask), (dropped, _), (missing, _) = kept, dropped, missing
        assert config.width == shape[2]
        assert kept_mask is None or kept_mask.shape == shape[:2]
    elif config.output == "concat":
        assert config.channels(GEOMETRY) == shape[1]
    else:
        assert config.width == 6  # 5 classes + the null class
    assert kept.shape == dropped.shape == shape
    # The unconditional version: what a batch without the input gives, and not the conditional output.
    torch.testing.assert_close(dropped, missing, rtol=0, atol=1e-6)
    assert not torch.equal(kept, dropped)


def test_a_dropped_sample_is_unconditional_and_the_others_are_not():
    embedder = build_embedder(LabelConfig(num_classes=5), GEOMETRY)
    y = embedder(embedder.prepare({"label": [0, 1, 2, 3]}), torch.tensor([False, True, False, True]))
    assert y.tolist() == [0, 5, 2, 5]
    concat = build_embedder(ClassMapConcatConfig(num_classes=11), GEOMETRY)
    maps = concat(concat.prepare(fake_batch()), torch.tensor([True, False, False, True]))
    assert not maps[0].any() and not maps[3].any() and maps[1].any() and maps[2].any()


def test_embedder_configs_check_their_fields():
    with pytest.raises(ValueError, match="dropout must be in"):
        LabelConfig(num_classes=2, dropout=1.5)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        ClassMapConcatConfig(num_classes=1)
    with pytest.raises(ValueError, match="need a width"):
        ClassMapTokensConfig(num_classes=3)
    with pytest.raises(ValueError, match="resize must be one of"):
        ClassMapConcatConfig(num_classes=3, resize="bilinear")
    with pytest.raises(ValueError, match="min_box and max_box"):
        InpaintConfig(min_box=0.8, max_box=0.5)
    with pytest.raises(ValueError, match="must be a multiple of the latent size"):
        build_embedder(LowResConfig(size=12), GEOMETRY)


# ---------------------------------------------------------------------------------------------------- the list


def test_dropout_is_addressed_by_name():
    config = ConditionerConfig([TextTransformerEmbedderConfig(text=TEXT, dropout=0.3), LabelConfig(num_classes=5)])
    conditioner = Conditioner(config, 16, 3, 4, 8)
    assert config.dropout_columns == ("caption", "class_map", "image", "label")
    assert config.dropout_rates == (0.3, 0.0, 0.0, 0.1) and config.dropout_rate("label") == 0.1
    assert conditioner.dropout_column("caption") == 0 and conditioner.dropout_column("label") == 3
    drop = conditioner.unconditional_mask(2)
    assert drop.tolist() == [[True, False, False, True]] * 2
    assert conditioner.keep(drop, ["input_ids"]).tolist() == [[False, False, False, True]] * 2
    with pytest.raises(KeyError, match="no embedder 'image'"):
        conditioner.dropout_column("image")


def test_the_list_checks_names_and_widths():
    with pytest.raises(ValueError, match="names must be unique"):
        ConditionerConfig([LabelConfig(num_classes=2), LabelConfig(num_classes=3)])
    with pytest.raises(ValueError, match="need one width"):
        ConditionerConfig([TextTransformerEmbedderConfig(text=TEXT), ClassMapTokensConfig(num_classes=3, width=8)])
    with pytest.raises(ValueError, match="not both"):
        ConditionerConfig([LabelConfig(num_classes=2)], text_encoder="clip")
    with pytest.raises(ConfigError, match="unknown embedder kind 't5'"):
        from_dict(ConditionerConfig, {"embedders": [{"kind": "t5"}]})
    with pytest.raises(ConfigError, match=r"embedders\[0\].*did you mean 'num_classes'"):
        from_dict(ConditionerConfig, {"embedders": [{"kind": "label", "num_class": 3}]})
    with pytest.raises(ConfigError, match="not both"):
        from_dict(ConditionerConfig, {"embedders": [], "text_encoder": "clip"})


def test_the_old_draw_stream_is_kept():
    """The flat conditioner drew (n, 4) dropout uniforms, always all four columns, then (n, 5) for inpainting boxes:
    these numbers, from a generator seeded with 0, are what an inpainting config drew before embedders."""
    config = ConditionerConfig(text_encoder="transformer", text=TEXT, image="inpaint")
    draws = Conditioner(config, 16, 3, 4, 8).draw(2, torch.Generator().manual_seed(0))
    assert list(draws) == ["cond_dropout", "inpaint_box"]
    want_dropout = torch.tensor([[0.4963, 0.7682, 0.0885, 0.1320], [0.3074, 0.6341, 0.4901, 0.8964]])
    want_boxes = torch.tensor([[0.4556, 0.6323, 0.3489, 0.4017, 0.0223], [0.1689, 0.2939, 0.5185, 0.6977, 0.8000]])
    torch.testing.assert_close(draws["cond_dropout"], want_dropout, rtol=0, atol=1e-4)
    torch.testing.assert_close(draws["inpaint_box"], want_boxes, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- a new kind


@dataclass
class SizeVectorConfig(EmbedderConfig):
    """A toy "vector" embedder (as SDXL's original-size conditioning): the image's size, Fourier-embedded."""

    kind: str = field(default="size_vector", init=False)
    frequencies: int = 4

    output: ClassVar[str] = "vector"
    default_name: ClassVar[str] = "original_size"

    @property
    def width(self) -> int:
        return 2 * self.frequencies


class SizeVectorEmbedder(Embedder):
    config_class = SizeVectorConfig
    keys = ("original_size",)

    def prepare(self, batch):
        size = batch.get("original_size")
        return {} if size is None else {"original_size": torch.as_tensor(size, dtype=torch.float32).reshape(-1)}

    def forward(self, prepared, dropped, encode=None):
        size = prepared.get("original_size", torch.zeros(len(dropped)))
        size = torch.where(dropped, torch.zeros_like(size), size.to(dropped.device))
        angles = size[:, None] / 10000 ** (torch.arange(self.config.frequencies) / self.config.frequencies)
        return torch.cat([angles.sin(), angles.cos()], dim=1)


def test_a_new_kind_is_one_class_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(EMBEDDERS, "size_vector", SizeVectorEmbedder)  # the registry line
    data = {"embedders": [{"kind": "class_map_concat", "num_classes": 3},
                          {"kind": "size_vector", "dropout": 0.2}]}
    config = from_dict(ConditionerConfig, data)
    assert from_dict(ConditionerConfig, json.loads(json.dumps(to_dict(config)))) == config
    # Its uniforms come after the fixed four, so the others' numbers do not move.
    assert config.dropout_columns[4:] == ("original_size",) and config.dropout_rates[4] == 0.2
    conditioner = Conditioner(config, 16, 3, 4, 8)
    draws = conditioner.draw(3, torch.Generator().manual_seed(0))
    assert draws["cond_dropout"].shape == (3, 5)
    cond = conditioner(conditioner.prepare({"original_size": [64, 128, 256]}))
    assert set(cond) == {"concat", "y"} and cond["y"].shape == (3, 8) and not cond["concat"].any()
    unconditional = conditioner({}, n=3)["y"]
    assert not torch.equal(cond["y"], unconditional)
    torch.testing.assert_close(conditioner(conditioner.prepare({"original_size": [64, 128, 256]}),
                                           drop=conditioner.unconditional_mask(3))["y"], unconditional)
    # Two of them: their vectors join along the last dimension (the UNet's ``y`` of SDXL's vector conditioning).
    two = Conditioner(ConditionerConfig([SizeVectorConfig(), SizeVectorConfig(name="target_size")]), 16, 3, 4, 8)
    assert two.config.dropout_columns[4:] == ("original_size", "target_size")
    assert two(two.prepare({"original_size": [64, 128]}))["y"].shape == (2, 16)


def test_a_label_vector_is_not_joined_with_others(monkeypatch):
    monkeypatch.setitem(EMBEDDERS, "size_vector", SizeVectorEmbedder)
    conditioner = Conditioner(ConditionerConfig([LabelConfig(num_classes=5), SizeVectorConfig()]), 16, 3, 4, 8)
    with pytest.raises(ValueError, match="must give float vectors"):
        conditioner(conditioner.prepare({"label": [1], "original_size": [64]}))


# ---------------------------------------------------------------------------------------------------- the old form

SCENE_CONFIGS = sorted(Path("configs").glob("ldm-scenes-*.yaml"))
BUNDLED_CONFIGS = sorted(Path("models").glob("*/config.json"))


def flat_conditioner(path: Path) -> dict:
    data = read_yaml(path) if path.suffix == ".yaml" else json.loads(path.read_text())
    flat = dict(data["model"]["conditioner"])
    if flat.get("text_encoder") == "transformer" and not flat.get("text", {}).get("vocab"):
        flat["text"] = {**flat.get("text", {}), "vocab": VOCAB}  # the trainer fills it in from the captions
    return flat


@pytest.mark.parametrize("path", SCENE_CONFIGS + BUNDLED_CONFIGS, ids=str)
def test_the_flat_and_the_list_form_build_the_same_conditioner(path):
    flat = flat_conditioner(path)
    from_flat = from_dict(ConditionerConfig, flat)
    as_list = to_dict(from_flat)
    assert list(as_list) == ["embedders"]  # what a model saves now
    from_list = from_dict(ConditionerConfig, json.loads(json.dumps(as_list)))
    assert from_list == from_flat
    old = from_dict(FlatConditionerConfig, flat)
    assert from_flat.inputs == tuple(name for name, used in (
        ("caption", old.text_encoder != "none"), ("class_map", old.class_map != "none"),
        ("image", old.image != "none"), ("label", old.num_classes > 0)) if used)
    assert (from_flat.text_encoder, from_flat.image, from_flat.class_map) == (old.text_encoder, old.image,
                                                                             old.class_map)
    geometry = (32, 3, 4, 8)
    modules = []
    for config in (from_flat, from_list):
        torch.manual_seed(0)  # the same construction order: the same initial weights
        modules.append(Conditioner(config, *geometry))
    a, b = modules
    assert list(a.state_dict()) == list(b.state_dict())
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    if from_flat.text_encoder != "none":
        assert any(k.startswith("transformer.") for k in a.state_dict())
    batch = {"caption": ["a red bag on the left", "a blue boot"],
             "class_map": torch.randint(0, 11, (2, 32, 32), generator=torch.Generator().manual_seed(1)),
             "image": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1}
    draws = [m.draw(2, torch.Generator().manual_seed(3)) for m in modules]
    assert draws[0]["cond_dropout"].shape == (2, 4)
    outputs = []
    for module, drawn in zip(modules, draws, strict=True):
        prepared = module.complete(module.prepare(batch), drawn)
        outputs.append(module(prepared, drop=module.dropout_mask(drawn["cond_dropout"]),
                              encode=lambda x: torch.nn.functional.avg_pool2d(x, 4).repeat(1, 2, 1, 1)[:, :4]))
    assert outputs[0].keys() == outputs[1].keys() and outputs[0]
    for key in outputs[0]:
        assert torch.equal(outputs[0][key], outputs[1][key]), key


def test_a_run_config_in_the_flat_form_still_trains_with_overrides():
    overrides = ["model.conditioner.text_dropout=0.5", "model.conditioner.text.width=64", "model.unet.context_dim=64"]
    exp = load_config(DiffusionExperiment, read_yaml("configs/ldm-scenes-txt2img.yaml"), overrides)
    text = exp.model.conditioner.embedder("caption")
    assert text.kind == "transformer" and text.dropout == 0.5 and text.text.width == 64
    assert exp.model.conditioner.text is text.text  # the trainer fills the vocabulary into the model's config
    saved = to_dict(exp)
    assert saved["model"]["conditioner"]["embedders"][0]["kind"] == "transformer"
    again = from_dict(DiffusionExperiment, json.loads(json.dumps(saved)))
    assert again.model.conditioner == exp.model.conditioner


def test_building_a_model_does_not_edit_the_callers_config():
    config = ConditionerConfig(text_encoder="minilm", minilm=MiniLMConfig(max_length=16))
    before = dataclasses.replace(config.embedders[0])
    unet = UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                      attention_resolutions=(1,), num_heads=-1, num_head_channels=32, context_dim=None)
    model = LatentDiffusion(LatentDiffusionConfig(image_size=8, channels=3, unet=unet, conditioning="crossattn",
                                                  conditioner=config))
    assert config.embedders[0] == before and not before.weights_sha256
    assert len(model.config.conditioner.minilm.weights_sha256) == 64
