"""Tests of the conditioning: BERT/MiniLM against transformers, the word tokenizer and jointly trained text encoder,
the conditioner (shapes per mode, dropout rates, unconditional inputs) and its wiring into LatentDiffusion."""

import dataclasses
import logging

import pytest
import torch

from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
from latentdiff.conditioning.bert import (
    BertConfig,
    BertModel,
    MiniLMTextEncoder,
    WordPieceTokenizer,
    minilm_model_dir,
)
from latentdiff.conditioning.conditioner import (
    Conditioner,
    ConditionerConfig,
    MiniLMConfig,
    inpaint_boxes,
)
from latentdiff.conditioning.embedders.base import FIXED_DROPOUT_COLUMNS
from latentdiff.conditioning.text import (
    TextTransformer,
    TextTransformerConfig,
    WordTokenizer,
    build_vocabulary,
    split_caption,
)
from latentdiff.config import to_dict
from latentdiff.diffusion.model import LatentDiffusion, LatentDiffusionConfig
from latentdiff.diffusion.sampling import sample as run_sampler
from latentdiff.diffusion.schedule import ScheduleConfig
from latentdiff.diffusion.unet import UNetConfig
from latentdiff.formats.native import build_latent_diffusion, load_latent_diffusion
from latentdiff.io.checkpoint import save_checkpoint

TRICKY_PROMPTS = [
    "a red sneaker on the left and a blue bag on the right",
    "Hello, World!!! (really?) -- yes; no: maybe...",
    "Café naïve résumé ÅNGSTRÖM İstanbul ß straße",
    "3.14 and 1,000,000 x2 $5 @home #tag ~x^y 10%",
    "qwzxvbn blorptastic supercalifragilistic",
    "中文字 hello 。end",
    "don't t-shirt o'clock",
    "tab\there\x00null zero\u200bwidth non\u00a0breaking\u3000ideographic",
    "emoji 😀 ok ＡＢＣ ﬁ",
    "hi[MASK]there [SEP] [cls]",
    "x" * 101,
    "",
    "word " * 80,  # over-long: truncated to 64
]
VOCAB = ["a", "red", "blue", "bag", "boot", "on", "the", "left", "right", "and", "t-shirt"]


# ---------------------------------------------------------------------------------------------------- BERT


def test_wordpiece_ids_equal_transformers_bert_tokenizer():
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertTokenizer(str(minilm_model_dir() / "vocab.txt"))
    ours = WordPieceTokenizer()
    want = reference(TRICKY_PROMPTS, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    ids, mask = ours(TRICKY_PROMPTS)
    assert ids.shape == (len(TRICKY_PROMPTS), 64) and ids.dtype == torch.long and mask.dtype == torch.bool
    for row, prompt in enumerate(TRICKY_PROMPTS):
        assert ids[row].tolist() == want["input_ids"][row].tolist(), prompt
    assert torch.equal(mask, want["attention_mask"].bool())
    assert ours.decode(ids[0]) == TRICKY_PROMPTS[0]
    assert ours.tokenize("blorptastic") == ["b", "##lor", "##pta", "##stic"]
    assert ours.tokenize("x" * 101) == ["[UNK]"]  # over 100 characters: unknown outright


def test_truncation_logs_a_warning(caplog):
    tokenizer = WordPieceTokenizer(max_length=8)
    with caplog.at_level(logging.WARNING, logger="latentdiff.conditioning.bert"):
        ids, mask = tokenizer(["a short one", "one two three four five six seven eight"])
    assert ids.shape == (2, 8) and int(mask[1].sum()) == 8 and ids[1, -1] == tokenizer.sep_token_id
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "truncated" in warnings[0].getMessage()
    assert "seven eight" in warnings[0].getMessage() and "prompt 1" in warnings[0].getMessage()


def test_minilm_hidden_states_equal_transformers_bert_model():
    transformers = pytest.importorskip("transformers")
    folder = minilm_model_dir()
    reference = transformers.BertModel.from_pretrained(str(folder)).eval()
    ours = BertModel.from_pretrained().eval()
    assert ours.config == BertConfig()  # all-MiniLM-L6-v2: 6 layers, 384 wide, 12 heads
    batch = transformers.BertTokenizer(str(folder / "vocab.txt"))(
        TRICKY_PROMPTS, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        want = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = ours(batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
    # Padding positions (which the UNet masks out) only differ by float rounding in the summation order.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Through the frozen encoder the conditioner uses: the same states, and padding is masked.
    states, mask = MiniLMTextEncoder()(TRICKY_PROMPTS[:3])
    torch.testing.assert_close(states[mask], want[:3][real[:3]], rtol=0, atol=1e-5)


def test_bert_loads_prefixed_and_legacy_layernorm_names():
    config = BertConfig(vocab_size=20, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                        max_position_embeddings=10)
    source = BertModel(config)
    weights = {("bert." + k).replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"):
               v for k, v in source.state_dict().items()}
    weights.update({"bert.pooler.dense.weight": torch.zeros(8, 8), "cls.predictions.bias": torch.zeros(20)})
    target = BertModel(config)
    target.load_weights(weights)
    ids = torch.tensor([[1, 5, 7, 2, 0]])
    assert torch.equal(target(ids, ids != 0), source(ids, ids != 0))
    from latentdiff.io.errors import CheckpointError

    with pytest.raises(CheckpointError, match="missing keys"):
        BertModel(config).load_weights({k: v for k, v in weights.items() if "layer.0.output.dense" not in k})


def test_minilm_encoder_keeps_its_frozen_weights_out_of_state_dict_and_parameters():
    encoder = MiniLMTextEncoder(max_length=16)
    assert list(encoder.parameters()) == [] and encoder.state_dict() == {}
    assert not encoder.bert.training and encoder.train().bert.training is False
    info = encoder.describe()
    assert len(info["weights_sha256"]) == 64 and info["version"]
    encoder.to(torch.float64)  # _apply reaches the hidden BERT
    assert encoder.bert.embeddings.word_embeddings.weight.dtype == torch.float64
    states, mask = encoder(["a red bag", ""])
    assert states.shape == (2, 16, 384) and mask.sum(1).tolist() == [5, 2]


# ---------------------------------------------------------------------------------------------------- jointly trained


def test_word_tokenizer_and_vocabulary(caplog):
    captions = ["A red bag on the left", "a blue boot", "a red T-shirt", "don't!"]
    assert split_caption("A red T-shirt, don't!") == ["a", "red", "t-shirt", ",", "don't", "!"]
    vocab = build_vocabulary(captions)
    assert vocab[:2] == ["a", "red"] and set(vocab) >= {"t-shirt", "don't", "!"}
    assert build_vocabulary(captions, min_count=2) == ["a", "red"]
    assert build_vocabulary(captions, max_size=1) == ["a"]
    tokenizer = WordTokenizer(vocab, max_length=6)
    ids, mask = tokenizer(["a red hat", ""])
    assert ids[0, :5].tolist() == [2, 4 + vocab.index("a"), 4 + vocab.index("red"), 1, 3]  # hat is [UNK]
    assert ids[1, :3].tolist() == [2, 3, 0] and mask[1].sum() == 2
    with caplog.at_level(logging.WARNING, logger="latentdiff.conditioning.text"):
        ids, _ = tokenizer(["a red bag on the left"])
    assert ids[0, -1] == tokenizer.eos_token_id and "dropping: 'the left'" in caplog.text
    with pytest.raises(ValueError, match="empty vocabulary"):
        TextTransformer(TextTransformerConfig())


def test_text_transformer_real_tokens_do_not_see_padding():
    torch.manual_seed(0)
    short = TextTransformer(TextTransformerConfig(vocab=VOCAB, max_length=8, width=32, layers=2, heads=4))
    long = TextTransformer(dataclasses.replace(short.config, max_length=12))
    long.load_state_dict({k: (v if k != "position_embedding" else torch.cat([v, torch.randn(4, 32)]))
                          for k, v in short.state_dict().items()})
    a, mask_a = short(["a red bag on the left"])
    b, mask_b = long(["a red bag on the left"])
    assert a.shape == (1, 8, 32) and b.shape == (1, 12, 32)
    torch.testing.assert_close(a[mask_a], b[mask_b], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- conditioner


def text_config(**changes) -> ConditionerConfig:
    fields = dict(text_encoder="transformer", text=TextTransformerConfig(vocab=VOCAB, max_length=8, width=32, layers=1,
                                                                        heads=2))
    return ConditionerConfig(**{**fields, **changes})


def fake_batch(n: int, size: int = 16, channels: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"caption": ["a red bag on the left", "a blue boot", "", "a t-shirt"][:n] * (n // 4 or 1),
            "class_map": torch.randint(0, 11, (n, size, size), generator=g),
            "image": torch.rand(n, channels, size, size, generator=g) * 2 - 1,
            "label": torch.arange(n) % 5}


def identity_encode(x: torch.Tensor) -> torch.Tensor:
    # A stand-in first stage with f = 2 and 4 channels: average-pool, then repeat a channel.
    pooled = torch.nn.functional.avg_pool2d(x, 2)
    return torch.cat([pooled, pooled[:, :1]], dim=1)


@pytest.mark.parametrize("changes,keys,context,concat", [
    (dict(), {"context", "context_mask"}, (4, 8, 32), None),
    (dict(text_encoder="none", class_map="concat", num_map_classes=11), {"concat"}, None, (4, 11, 8, 8)),
    (dict(text_encoder="none", class_map="concat", num_map_classes=11, class_map_resize="area"), {"concat"}, None,
     (4, 11, 8, 8)),
    (dict(text_encoder="none", class_map="crossattn", num_map_classes=11, class_map_width=24),
     {"context", "context_mask"}, (4, 64, 24), None),
    (dict(class_map="crossattn", num_map_classes=11), {"context", "context_mask"}, (4, 8 + 64, 32), None),
    (dict(text_encoder="none", image="lowres", lowres_size=8), {"concat"}, None, (4, 3, 8, 8)),
    (dict(text_encoder="none", image="lowres", lowres_size=16), {"concat"}, None, (4, 12, 8, 8)),  # space-to-depth
    (dict(text_encoder="none", image="lowres", lowres_size=4), {"concat"}, None, (4, 3, 8, 8)),  # upsampled
    (dict(text_encoder="none", image="lowres", lowres_size=8, lowres_space="latents"), {"concat"}, None, (4, 4, 8, 8)),
    (dict(image="inpaint"), {"context", "context_mask", "concat"}, (4, 8, 32), (4, 5, 8, 8)),
    (dict(text_encoder="none", num_classes=5), {"y"}, None, None),
    (dict(class_map="concat", num_map_classes=11, image="lowres", num_classes=5),
     {"context", "context_mask", "concat", "y"}, (4, 8, 32), (4, 14, 8, 8)),
])
def test_conditioner_shapes_per_mode(changes, keys, context, concat):
    torch.manual_seed(0)
    config = text_config(**changes)
    conditioner = Conditioner(config, image_size=16, image_channels=3, latent_channels=4, latent_size=8)
    batch = fake_batch(4)
    prepared = conditioner.prepare(batch)
    if config.image == "inpaint":
        boxes = conditioner.draw(4, torch.Generator().manual_seed(1))["inpaint_box"]
        prepared["mask"] = conditioner.training_masks(boxes)
    cond = conditioner(prepared, encode=identity_encode)
    assert set(cond) == keys
    if context is not None:
        assert cond["context"].shape == context and cond["context_mask"].shape == context[:2]
        assert config.context_dim == context[2]
    if concat is not None:
        assert cond["concat"].shape == concat and conditioner.concat_channels == concat[1]
    if "y" in cond:
        assert cond["y"].tolist() == [0, 1, 2, 3]
    # No inputs at all: the unconditional model, same shapes.
    empty = conditioner({}, encode=identity_encode, n=4)
    assert {k: v.shape for k, v in empty.items()} == {k: v.shape for k, v in cond.items()}


def test_class_map_concat_is_a_one_hot_at_the_latent_size():
    conditioner = Conditioner(text_config(text_encoder="none", class_map="concat", num_map_classes=3),
                              image_size=4, image_channels=3, latent_channels=4, latent_size=2)
    class_map = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 0], [2, 2, 0, 0]]])
    concat = conditioner(conditioner.prepare({"class_map": class_map}))["concat"]
    assert concat.shape == (1, 3, 2, 2) and torch.equal(concat.sum(1), torch.ones(1, 2, 2))
    assert concat.argmax(1).tolist() == [[[0, 1], [2, 2]]]  # nearest: each cell's top-left pixel
    conditioner.embedder("class_map").config.resize = "area"
    area = conditioner(conditioner.prepare({"class_map": class_map}))["concat"]
    assert area[0, :, 1, 1].tolist() == [0.75, 0.0, 0.25]  # the fraction of each class in the cell


def test_dropout_rates_and_unconditional_inputs():
    torch.manual_seed(0)
    config = text_config(class_map="concat", num_map_classes=11, image="lowres", num_classes=5, text_dropout=0.3,
                         class_map_dropout=0.2, image_dropout=0.5, label_dropout=0.1)
    conditioner = Conditioner(config, image_size=16, image_channels=3, latent_channels=4, latent_size=8)
    draws = conditioner.draw(40000, torch.Generator().manual_seed(3))
    drop = conditioner.dropout_mask(draws["cond_dropout"])
    assert FIXED_DROPOUT_COLUMNS == ("caption", "class_map", "image", "label")
    for column, rate in enumerate((0.3, 0.2, 0.5, 0.1)):
        assert abs(float(drop[:, column].float().mean()) - rate) < 0.01
    again = conditioner.dropout_mask(conditioner.draw(40000, torch.Generator().manual_seed(3))["cond_dropout"])
    assert torch.equal(drop, again)  # seeded

    n = 64
    batch = fake_batch(n)
    prepared = conditioner.prepare(batch)
    kept = conditioner(prepared, encode=identity_encode)
    dropped = conditioner(prepared, drop=drop[:n], encode=identity_encode)
    empty = conditioner({}, encode=identity_encode, n=n)  # no inputs: every one unconditional
    empty_text = conditioner.transformer(["" for _ in range(n)])[0]
    for i in range(n):
        text, class_map, image, label = drop[i].tolist()
        want_context = empty_text[i] if text else kept["context"][i]
        torch.testing.assert_close(dropped["context"][i], want_context, rtol=0, atol=1e-6)
        maps, lowres = dropped["concat"][i, :11], dropped["concat"][i, 11:]
        assert torch.equal(maps, torch.zeros_like(maps) if class_map else kept["concat"][i, :11])
        assert torch.equal(lowres, torch.zeros_like(lowres) if image else kept["concat"][i, 11:])
        assert int(dropped["y"][i]) == (5 if label else int(batch["label"][i]))
    assert torch.equal(empty["y"], torch.full((n,), 5)) and not empty["concat"].any()
    torch.testing.assert_close(empty["context"], empty_text, rtol=0, atol=1e-6)
    # The CFG branch drops exactly the inputs trained with dropout.
    config_no_image = text_config(image="lowres", image_dropout=0.0)
    c2 = Conditioner(config_no_image, image_size=16, image_channels=3, latent_channels=4, latent_size=8)
    assert c2.unconditional_mask(2).tolist() == [[True, False, False, False]] * 2


def test_inpainting_boxes_follow_their_uniforms():
    n, size = 20000, 16
    uniform = torch.rand(n, 5, generator=torch.Generator().manual_seed(0))
    masks = inpaint_boxes(uniform, size, full_prob=0.25, min_box=0.25, max_box=0.75)
    assert masks.shape == (n, 1, size, size) and set(masks.unique().tolist()) <= {0.0, 1.0}
    full = masks.flatten(1).all(1)
    assert abs(float(full.float().mean()) - 0.25) < 0.01 and torch.equal(full, uniform[:, 0] < 0.25)
    boxes = masks[~full, 0]
    rows, cols = boxes.any(2).sum(1), boxes.any(1).sum(1)
    assert int(rows.min()) == 4 and int(rows.max()) == 12 and int(cols.min()) == 4 and int(cols.max()) == 12
    assert torch.equal(boxes.sum((1, 2)), rows * cols)  # each one rectangle


# ---------------------------------------------------------------------------------------------------- the model


def tiny_rgb_autoencoder() -> AutoencoderConfig:
    return AutoencoderConfig(in_channels=3, out_ch=3, resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                             z_channels=4, embed_dim=4, norm_groups=8)


@pytest.fixture(scope="module")
def first_stage_path(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_rgb_autoencoder()
    root = tmp_path_factory.mktemp("ae_rgb")
    save_checkpoint(root, 1, Autoencoder(cfg).state_dict(), {"task": "autoencoder", "model": to_dict(cfg)})
    return root


def conditioned_model(first_stage_path, conditioning: str = "crossattn", in_channels: int = 4,
                      **conditioner) -> LatentDiffusion:
    torch.manual_seed(0)
    unet = UNetConfig(in_channels=in_channels, out_channels=4, model_channels=32, channel_mult=(1, 2),
                      num_res_blocks=1, attention_resolutions=(1, 2), num_heads=-1, num_head_channels=32,
                      context_dim=None, use_spatial_transformer=conditioning != "concat")
    config = LatentDiffusionConfig(first_stage=str(first_stage_path), image_size=16, channels=3, unet=unet,
                                   schedule=ScheduleConfig(num_timesteps=50), scale_factor=0.7,
                                   conditioning=conditioning, conditioner=text_config(**conditioner))
    model = build_latent_diffusion(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the UNet's zero-initialised layers get weights, so that the conditioning matters
        for p in model.unet.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def test_the_text_encoder_trains_with_the_unet_and_saves_as_cond_stage_model(first_stage_path):
    model = conditioned_model(first_stage_path).train()
    assert model.config.unet.context_dim == 32  # filled in from the conditioner
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in [*model.unet.parameters(), *model.cond_stage_model.parameters()]}
    assert any(k.startswith("cond_stage_model.transformer.token_embedding") for k in model.state_dict())
    batch = fake_batch(4)
    z0 = model.encode(batch["image"], torch.Generator().manual_seed(0))
    loss, _ = model.loss(z0, generator=torch.Generator().manual_seed(1), inputs=batch)
    loss.backward()
    grads = [p.grad for p in model.cond_stage_model.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for p in model.first_stage_model.parameters())


def test_conditioner_draws_come_after_the_old_ones(first_stage_path):
    model = conditioned_model(first_stage_path, image="inpaint", conditioning="hybrid", in_channels=9)
    plain = LatentDiffusion(dataclasses.replace(model.config, conditioning="none", conditioner=None,
                                                unet=dataclasses.replace(model.config.unet, in_channels=4,
                                                                         context_dim=None,
                                                                         use_spatial_transformer=False)))
    a = model.draw_training_noise(6, torch.Generator().manual_seed(5))
    b = plain.draw_training_noise(6, torch.Generator().manual_seed(5))
    assert list(a) == [*b, "cond_dropout", "inpaint_box"]
    for key in b:
        assert torch.equal(a[key], b[key]), key
    assert a["cond_dropout"].shape == (6, 4) and a["inpaint_box"].shape == (6, 5)


def test_sampling_with_text_guidance_one_is_the_conditional_model(first_stage_path):
    model = conditioned_model(first_stage_path, text_dropout=0.1)
    captions = ["a red bag on the left", "a blue boot"]
    got = model.sample(2, "ddim", 3, torch.Generator().manual_seed(0), cond={"caption": captions}, decode=False)
    cond = model.encode_conditioning({"caption": captions}, 2)
    want = run_sampler(model.denoiser(), (2, 4, 8, 8), model.sigmas(3), "ddim", torch.Generator().manual_seed(0),
                       extra_args=cond)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    guided = model.sample(2, "ddim", 3, torch.Generator().manual_seed(0), cond={"caption": captions},
                          guidance_scale=3.0, decode=False)
    explicit = model.sample(2, "ddim", 3, torch.Generator().manual_seed(0), cond={"caption": captions},
                            guidance_scale=3.0, decode=False, uncond={"caption": ""})
    negative = model.sample(2, "ddim", 3, torch.Generator().manual_seed(0), cond={"caption": captions},
                            guidance_scale=3.0, decode=False, uncond={"caption": "a red boot"})
    assert not torch.allclose(guided, got) and torch.equal(guided, explicit) and not torch.allclose(guided, negative)
    # One caption for the whole batch, and unconditional samples without any.
    one = model.sample(2, "ddim", 3, torch.Generator().manual_seed(0), cond={"caption": "a blue boot"}, decode=False)
    torch.testing.assert_close(one[1], got[1], rtol=0, atol=1e-6)
    assert model.sample(2, "ddim", 2, torch.Generator().manual_seed(0)).shape == (2, 3, 16, 16)
    no_dropout = conditioned_model(first_stage_path, text_dropout=0.0)
    with pytest.raises(ValueError, match="without conditioning dropout"):
        no_dropout.sample(1, "ddim", 2, cond={"caption": "a bag"}, guidance_scale=2.0)
    with pytest.raises(ValueError, match="unknown conditioning inputs"):
        model.sample(1, "ddim", 2, cond={"prompt": "a bag"})


def test_inpainting_model_samples_from_an_image_and_mask(first_stage_path):
    model = conditioned_model(first_stage_path, image="inpaint", conditioning="hybrid", in_channels=9)
    batch = fake_batch(2)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1
    inputs = {"caption": batch["caption"][:2], "image": batch["image"], "mask": mask}
    images = model.sample(2, "ddim", 2, torch.Generator().manual_seed(0), cond=inputs, guidance_scale=2.0)
    assert images.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="needs a mask"):
        model.sample(2, "ddim", 2, cond={"image": batch["image"]})


def test_minilm_model_checkpoint_has_no_text_weights_and_reloads_them(first_stage_path, tmp_path, caplog):
    torch.manual_seed(0)
    unet = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(2,), num_heads=-1, num_head_channels=32, context_dim=None)
    config = LatentDiffusionConfig(first_stage=str(first_stage_path), image_size=16, channels=3, unet=unet,
                                   schedule=ScheduleConfig(num_timesteps=50), scale_factor=0.7,
                                   conditioning="crossattn",
                                   conditioner=ConditionerConfig(text_encoder="minilm",
                                                                 minilm=MiniLMConfig(max_length=16)))
    model = build_latent_diffusion(config)
    assert model.config.unet.context_dim == 384 and model.config.conditioner.minilm.weights_sha256
    assert not any(k.startswith("cond_stage_model") for k in model.state_dict())
    assert model.conditioner_parameters() == []
    save_checkpoint(tmp_path / "run", 1, model.state_dict(), {"task": "diffusion", "model": to_dict(model.config)})
    loaded = load_latent_diffusion(tmp_path / "run")
    cond = {"caption": ["a green coat at the top"]}
    torch.testing.assert_close(loaded.encode_conditioning(cond, 1)["context"],
                               model.encode_conditioning(cond, 1)["context"], rtol=0, atol=0)
    # Other weights recorded than installed: loading warns that the conditioning will not match.
    changed = to_dict(model.config)
    changed["conditioner"]["embedders"][0]["weights_sha256"] = "0" * 64
    save_checkpoint(tmp_path / "other", 1, model.state_dict(), {"task": "diffusion", "model": changed})
    with caplog.at_level(logging.WARNING):
        load_latent_diffusion(tmp_path / "other")
    assert "will not match" in caplog.text


@pytest.mark.parametrize("conditioning,changes,unet_changes,message", [
    ("concat", {}, {}, "use conditioning: crossattn"),
    ("crossattn", {"text_encoder": "none", "class_map": "concat", "num_map_classes": 11}, {},
     "use conditioning: concat"),
    ("crossattn", {}, {"context_dim": 64}, r"context_dim \(64\) must equal the conditioner's token width \(32\)"),
    ("hybrid", {"image": "inpaint"}, {"in_channels": 8},
     r"in_channels \(8\) must be 9: 4 latent channels .* \+ 5 concatenated"),
    ("crossattn", {}, {"use_spatial_transformer": False}, "use_spatial_transformer"),
])
def test_conditioner_config_mismatches_give_clear_errors(first_stage_path, conditioning, changes, unet_changes,
                                                        message):
    unet = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(2,), num_heads=-1, num_head_channels=32, context_dim=None,
                      use_spatial_transformer=True)
    with pytest.raises(ValueError, match=message):
        build_latent_diffusion(LatentDiffusionConfig(
            first_stage=str(first_stage_path), image_size=16, channels=3,
            unet=dataclasses.replace(unet, **unet_changes), conditioning=conditioning,
            conditioner=text_config(**changes)))


def test_conditioner_needs_a_conditioner_mode():
    with pytest.raises(ValueError, match="model.conditioner is set but conditioning is 'none'"):
        LatentDiffusionConfig(conditioner=text_config())
    with pytest.raises(ValueError, match="needs model.conditioner"):
        LatentDiffusionConfig(conditioning="crossattn")
    with pytest.raises(ValueError, match="must be one of none, minilm, transformer, clip"):
        ConditionerConfig(text_encoder="t5")
    with pytest.raises(ValueError, match="no inputs"):
        ConditionerConfig()


@pytest.mark.parametrize("name", ["txt2img", "seg2img", "inpaint", "upscale"])
def test_shipped_scene_configs_fit_the_kl_f4_scenes_first_stage_at_full_size(name):
    from latentdiff.config import from_dict, load_config, read_yaml
    from latentdiff.train.diffusion import DiffusionExperiment

    ae_config = from_dict(AutoencoderConfig, read_yaml("configs/kl-f4-scenes.yaml")["model"])
    exp = load_config(DiffusionExperiment, read_yaml(f"configs/ldm-scenes-{name}.yaml"))
    if exp.model.conditioner.text_encoder == "transformer":  # the trainer builds the vocabulary from the captions
        from latentdiff.conditioning.text import build_vocabulary

        exp.model.conditioner.text.vocab = build_vocabulary(["a red bag on the left", "a blue boot"])
    model = LatentDiffusion(exp.model, first_stage=Autoencoder(ae_config))
    model.config.scale_factor = 1.0
    assert model.latent_shape == (4, 8, 8) and exp.data.name == "fmnist_scenes"
    inputs = {"caption": ["a red bag on the left"], "class_map": torch.zeros(1, 32, 32, dtype=torch.long),
              "image": torch.zeros(1, 3, 32, 32), "mask": torch.ones(1, 1, 32, 32)}
    cond = model.encode_conditioning(inputs, 1)
    out = model(torch.zeros(1, 4, 8, 8), torch.tensor([10]), cond)
    assert out.shape == (1, 4, 8, 8)
