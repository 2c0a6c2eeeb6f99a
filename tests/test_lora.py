"""LoRA: the adapter layers (exact start, merge and unmerge), the kohya and diffusers/PEFT files (both ways), LoRA
training from the bundled scenes model (resume, generate), and the interop test: a LoRA trained here on a tiny
Stable Diffusion model, loaded by diffusers' ``load_lora_weights``, gives our image for the kohya file and for the
PEFT file. The issue asks for 1/255; we see ~4e-6 and assert 1e-4, as tests/test_sd_pipeline.py does (the LoRA
itself moves the image by ~0.14)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from test_sd_pipeline import (
    PROMPT,
    UNET,
    initial_latents,
    load_theirs,
    max_diff,
    tiny_components,
    with_scheduler,
    write_tokenizer,
)

from latentdiff.cli import main
from latentdiff.config import load_config
from latentdiff.formats import read_components, save_diffusers
from latentdiff.formats.lora import (
    KOHYA_FILE,
    PEFT_FILE,
    LoRAPair,
    LoRAWeights,
    apply_lora_to_components,
    read_lora,
    write_lora,
)
from latentdiff.io.checkpoint import read_checkpoint
from latentdiff.io.errors import CheckpointError
from latentdiff.nn.lora import LoRALayer, inject_lora, lora_layers, merged_state_dict
from latentdiff.pipelines import StableDiffusionPipeline
from latentdiff.train.diffusion import DiffusionExperiment, DiffusionTrainer

INTEROP_TOL = 1e-4


def _perturbed(layer: LoRALayer, seed: int) -> LoRALayer:
    with torch.no_grad():
        layer.lora_up.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return layer


@pytest.mark.parametrize("base", [torch.nn.Linear(6, 5), torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)])
def test_adapter_starts_identical_and_merges_exactly(base) -> None:
    x = torch.randn(2, 6) if isinstance(base, torch.nn.Linear) else torch.randn(2, 3, 8, 8)
    plain = base(x).detach()
    before = base.weight.detach().clone()
    layer = LoRALayer(base, rank=2, alpha=4.0)
    assert torch.equal(layer(x), plain)  # up starts at zero
    _perturbed(layer, 0)
    adapted = layer(x).detach()
    assert max_diff(adapted, plain) > 1e-3
    layer.merge()
    assert torch.allclose(layer(x), adapted, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.weight, before) and torch.equal(layer(x), adapted)


def test_merged_state_dict_loads_into_the_plain_model() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    wrapped = inject_lora(model, ["0", "2"], rank=2, alpha=2)
    assert set(wrapped) == {"0", "2"} and set(lora_layers(model)) == {"0", "2"}
    for seed, layer in enumerate(wrapped.values()):
        _perturbed(layer, seed)
    plain.load_state_dict(merged_state_dict(model))
    x = torch.randn(3, 4)
    assert torch.allclose(plain(x), model(x), atol=1e-6)
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        inject_lora(plain, ["attn1.to_q"], rank=1, alpha=1)


def _random_lora(paths: list[str], shapes: dict[str, torch.Size], seed: int) -> dict[str, LoRAPair]:
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for path in paths:
        out, inp = shapes[path][:2]
        pairs[path] = LoRAPair(torch.randn(3, inp, *shapes[path][2:], generator=g),
                               torch.randn(out, 3, *([1, 1] if len(shapes[path]) == 4 else []), generator=g), 6.0)
    return pairs


@pytest.mark.parametrize("file_format", ["kohya", "peft"])
def test_files_round_trip_to_the_same_update(tmp_path, file_format) -> None:
    comps = tiny_components(UNET, seed=0)
    shapes = {k[:-len(".weight")]: v.shape for k, v in {**comps.unet, **comps.text_encoder}.items()
              if k.endswith(".weight")}
    unet_paths = ["input_blocks.1.1.transformer_blocks.0.attn2.to_k", "output_blocks.2.0.in_layers.2"]
    text_paths = ["text_model.encoder.layers.1.self_attn.out_proj"]
    lora = LoRAWeights(_random_lora(unet_paths, shapes, 0), _random_lora(text_paths, shapes, 1))
    path = write_lora(lora, UNET, tmp_path / "x.safetensors", file_format)
    keys = list(load_file(str(path)))
    expected = {"kohya": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
                "peft": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"}
    assert expected[file_format] in keys
    back = read_lora(path, UNET, [p for p in shapes if p.startswith("text_model.")])
    for part, pairs in lora.parts().items():
        got = back.parts()[part]
        assert set(got) == set(pairs)
        for name, pair in pairs.items():
            assert torch.allclose(got[name].delta(shapes[name]), pair.delta(shapes[name]), atol=1e-4)
    with pytest.raises(CheckpointError, match="not in this model"):
        read_lora(path, UNET, [])  # the text-encoder layers cannot be placed


# ------------------------------------------------------------------------------------------------ training


def _experiment(init_from, out_dir, **overrides: str) -> DiffusionExperiment:
    data = {"task": "diffusion", "init_from": str(init_from),
            "data": {"name": "fmnist_scenes", "limit": 16, "channels": 3},
            "train": {"out_dir": str(out_dir), "steps": 3, "batch_size": 4, "lr": 0.02, "ckpt_every": 0,
                      "sample_every": 0, "log_every": 1, "warmup_steps": 0, "threads": 2,
                      "betas": [0.9, 0.999]},
            "lora": {"rank": 4, "alpha": 2, "targets": "attention+ff+conv"},
            "cache_latents": False, "sample_images": 1, "sample_steps": 1}
    return load_config(DiffusionExperiment, data, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny SD diffusers folder, a LoRA run of 3 steps on it (UNet and CLIP text encoder), and the run's folder."""
    root = tmp_path_factory.mktemp("lora_sd")
    tokenizer = write_tokenizer(root / "tokenizer")  # padded with the end token, as SD v1
    base = save_diffusers(tiny_components(UNET, seed=0, tokenizer=tokenizer), root / "base")
    trainer = DiffusionTrainer(_experiment(base, root / "run", **{"lora.text_encoder": "true"}))
    run = trainer.run()
    assert trainer.lora_text and all(layer.lora_up.weight.abs().max() > 0 for layer in trainer.lora_text.values())
    return base, run / "checkpoints" / "step_0000003"


@pytest.mark.parametrize("file_name", [KOHYA_FILE, PEFT_FILE])
def test_trained_lora_loads_in_diffusers_with_our_image(tiny_sd, file_name) -> None:
    base, checkpoint = tiny_sd
    ours_base = StableDiffusionPipeline.from_components(read_components(base))
    base_text = read_components(base).text_encoder
    merged = apply_lora_to_components(read_components(base), checkpoint / file_name)
    ours = StableDiffusionPipeline.from_components(merged)
    theirs = with_scheduler(load_theirs(base), "ddim")
    theirs.load_lora_weights(str(checkpoint), weight_name=file_name)
    run = dict(guidance_scale=7.5, steps=4, sampler="ddim", latents=initial_latents(), generator=1)
    got = ours.text_to_image(PROMPT, **run).images
    expected = theirs(PROMPT, guidance_scale=7.5, num_inference_steps=4, latents=initial_latents(),
                      generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert max_diff(got, expected) <= INTEROP_TOL
    assert max_diff(got, ours_base.text_to_image(PROMPT, **run).images) > 20 * INTEROP_TOL  # the LoRA matters
    unet_only = StableDiffusionPipeline.from_components(dataclasses.replace(merged, text_encoder=base_text))
    assert max_diff(got, unet_only.text_to_image(PROMPT, **run).images) > 20 * INTEROP_TOL  # so do CLIP's adapters
    # The run's model.safetensors is the same merge, made by the trainer; the CLIP adapters are in the files.
    weights, _ = read_checkpoint(checkpoint)
    key = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert torch.allclose(weights["model.diffusion_model." + key], merged.unet[key], atol=1e-6)
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(weights["cond_stage_model.transformer." + key], merged.text_encoder[key], atol=1e-6)
    assert not torch.equal(merged.text_encoder[key], base_text[key])
    keys = load_file(str(checkpoint / file_name)).keys()
    assert {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"} & set(keys)


def test_lora_on_the_scenes_model_resumes_exactly_and_generates(tmp_path, capsys) -> None:
    """Adapters on the bundled native model (UNet and text transformer): 3 steps straight equal 2 + a resumed 1;
    `latentdiff generate --model RUN` samples the merged model; the files load back into our model."""
    straight = DiffusionTrainer(_experiment("models/scenes-txt2img", tmp_path / "a", **{"lora.text_encoder": "true"}))
    straight.run()
    assert straight.lora_text  # the text transformer has adapters
    DiffusionTrainer(_experiment("models/scenes-txt2img", tmp_path / "b", **{"lora.text_encoder": "true",
                                                                            "train.steps": "2"})).run()
    resumed = _experiment("models/scenes-txt2img", tmp_path / "b", **{"lora.text_encoder": "true"})
    DiffusionTrainer(resumed, resume=tmp_path / "b").run()
    for name in (KOHYA_FILE, PEFT_FILE):
        a = load_file(str(tmp_path / "a" / "checkpoints" / "step_0000003" / name))
        b = load_file(str(tmp_path / "b" / "checkpoints" / "step_0000003" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    weights, config = read_checkpoint(tmp_path / "a")
    base, _ = read_checkpoint("models/scenes-txt2img")
    assert weights.keys() == base.keys() and config["lora"]["rank"] == 4
    text = straight.model.cond_stage_model.transformer
    paths = [n for n, _ in text.named_modules()]
    lora = read_lora(tmp_path / "a" / "checkpoints" / "step_0000003" / KOHYA_FILE, straight.model.config.unet, paths)
    assert set(lora.text_encoder) == set(straight.lora_text) and set(lora.unet) == set(straight.lora_unet)
    assert main(["generate", "--model", str(tmp_path / "a"), "a red bag on the left", "--steps", "2",
                 "-o", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()


def test_full_fine_tuning_from_the_scenes_model(tmp_path) -> None:
    """init_from without LoRA: the run starts from the base's weights (its first step's loss is the base's, far
    below a new model's), the text encoder can be frozen, and a model section that disagrees is one clear error."""
    exp = _experiment("models/scenes-txt2img", tmp_path / "full", **{"lora.rank": "0", "text_encoder": "frozen",
                                                                    "train.steps": "1", "train.lr": "1e-5"})
    trainer = DiffusionTrainer(exp)
    trainer.run()
    assert not trainer.cond_params and trainer.ema is not None
    log = (tmp_path / "full" / "log.csv").read_text().splitlines()
    assert float(log[1].split(",")[1]) < 0.5  # a new model's v-loss starts near 1
    weights, _ = read_checkpoint(tmp_path / "full")
    base, _ = read_checkpoint("models/scenes-txt2img")
    key = "cond_stage_model.transformer.blocks.0.qkv.weight"
    assert torch.equal(weights[key], base[key].float())  # frozen
    with pytest.raises(ValueError, match="model.scale_factor"):
        DiffusionTrainer(_experiment("models/scenes-txt2img", tmp_path / "bad", **{"model.scale_factor": "0.5"})).run()


def test_clip_text_encoder_trains_in_full_fine_tuning(tiny_sd, tmp_path) -> None:
    """text_encoder: trained on a Stable Diffusion model: CLIP's weights get gradients and move (and its EMA)."""
    base, _ = tiny_sd
    exp = _experiment(base, tmp_path / "full", **{"lora.rank": "0", "text_encoder": "trained", "train.steps": "1",
                                                 "use_ema": "false"})
    trainer = DiffusionTrainer(exp)
    trainer.run()
    assert trainer.cond_params and trainer.model.cond_stage_model.transformer.trains
    weights, _ = read_checkpoint(tmp_path / "full")
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    moved = weights["cond_stage_model.transformer." + key] - read_components(base).text_encoder[key]
    assert moved.abs().max() > 1e-4
