"""The task verbs on native models: generate, img2img, inpaint, seg2img, upscale and `sample --prompt`, end to end.

Tiny models are trained for 2 steps from each configs/ldm-scenes-*.yaml on 16 px scenes over a random RGB first stage
(f = 2, so 8x8x4 latents, the size of the upscaler's 8x8 low-res input), as tests/test_train_diffusion.py does. Two
training steps leave the zero-initialised output layers near zero, so those get seeded random weights: the
conditioning then shows in the images. The text-to-image model uses the jointly trained text transformer (no
MiniLM load per command); the inpainting model uses the text transformer of its config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file

from latentdiff import cli
from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
from latentdiff.cli import generate as cli_generate
from latentdiff.config import to_dict
from latentdiff.io.checkpoint import resolve_checkpoint, save_checkpoint
from latentdiff.pipelines import LatentDiffusionPipeline, StableDiffusionPipeline, load_pipeline
from latentdiff.pipelines.images import read_class_map, save_class_map, to_image_tensor, to_mask_tensor

SIZE = 16
TINY = ["model.unet.model_channels=32", "model.unet.num_res_blocks=1", "model.schedule.num_timesteps=50",
        f"data.image_size={SIZE}", "data.limit=8", "train.batch_size=4", "train.log_every=2", "train.ckpt_every=2",
        "train.sample_every=100", "train.warmup_steps=2", "train.threads=1", "train.time_limit_minutes=0",
        "train.device=cpu", "sample_images=2", "sample_steps=2", "ema_decay=0.99", "train.steps=2"]
CONFIGS = {
    "txt2img": ["model.conditioner.text_encoder=transformer", "model.unet.context_dim=32",
                "model.conditioner.text.width=32", "model.conditioner.text.layers=1", "model.conditioner.text.heads=2"],
    "inpaint": ["model.conditioner.minilm.max_length=24"],
    "seg2img": [],
    "upscale": [],
}
PROMPT = "a red sneaker on the left and a blue bag on the right"


def _perturb_checkpoint(run: Path, seed: int) -> None:
    """Seeded weights for the UNet's near-zero (zero-initialised) tensors, in place, keeping the stored config."""
    file = resolve_checkpoint(run)
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    weights = load_file(str(file))
    g = torch.Generator().manual_seed(seed)
    for key, value in weights.items():
        if key.startswith("model.diffusion_model.") and float(value.abs().max()) < 1e-2:
            weights[key] = 0.05 * torch.randn(value.shape, generator=g)
    save_file(weights, str(file), metadata=metadata)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    ae = AutoencoderConfig(in_channels=3, out_ch=3, resolution=SIZE, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                           z_channels=4, embed_dim=4, norm_groups=8)
    root = tmp_path_factory.mktemp("tasks")
    save_checkpoint(root / "ae", 1, Autoencoder(ae).state_dict(), {"task": "autoencoder", "model": to_dict(ae)})
    out = {}
    for seed, (name, extra) in enumerate(CONFIGS.items()):
        run = root / name
        assert cli.main(["train", f"configs/ldm-scenes-{name}.yaml", *TINY, *extra, f"train.out_dir={run}",
                         f"model.first_stage={root / 'ae'}"]) == 0
        _perturb_checkpoint(run, seed)
        out[name] = run
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Input images: a random RGB image, a mask (white box), a class map (palette and greyscale), a low-res image."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    paths = {name: root / f"{name}.png" for name in ("image", "other", "mask", "map", "map_grey", "map2", "lowres",
                                                      "odd", "big_map", "bad_map", "mask_small")}
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(paths["image"])
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(paths["other"])
    Image.fromarray(rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)).save(paths["odd"])
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[3:11, 5:13] = 255
    Image.fromarray(mask).save(paths["mask"])
    Image.fromarray(mask[:12, :12]).save(paths["mask_small"])
    class_map = np.zeros((SIZE, SIZE), np.int64)
    class_map[4:12, 1:8] = 1 + 7  # a sneaker on the left
    class_map[4:12, 9:15] = 1 + 8  # a bag on the right
    save_class_map(class_map, paths["map"])
    Image.fromarray(class_map.astype(np.uint8)).save(paths["map_grey"])  # the same map as grey values
    save_class_map(np.where(class_map > 0, 1 + 3, 0), paths["map2"])  # two dresses instead
    save_class_map(np.zeros((20, 20), np.int64), paths["big_map"])
    save_class_map(np.full((SIZE, SIZE), 11), paths["bad_map"])  # 11 classes are 0 to 10
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(paths["lowres"])
    return paths


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ------------------------------------------------------------------------------------------------ text-to-image


def test_generate_matches_model_sample_and_is_deterministic(runs, tmp_path, capsys) -> None:
    pipe = load_pipeline(runs["txt2img"])
    assert isinstance(pipe, LatentDiffusionPipeline) and pipe.has_text_conditioning and pipe.default_guidance == 3.0
    got = pipe.text_to_image(PROMPT, "a green shirt", num_images=2, steps=3, sampler="ddim", guidance_scale=2.0,
                             generator=5, decode=False).latents
    want = pipe.model.sample(2, "ddim", 3, torch.Generator().manual_seed(5), cond={"caption": [PROMPT] * 2},
                             uncond={"caption": "a green shirt"}, guidance_scale=2.0, decode=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    common = ["--model", runs["txt2img"], "--steps", 3, "--sampler", "euler_ancestral"]
    a, b, c, d = (tmp_path / f"{n}.png" for n in "abcd")
    assert run_cli(capsys, "generate", PROMPT, *common, "--seed", 1, "-o", a)[:2] == (0, f"wrote 1 image to {a}\n")
    assert run_cli(capsys, "generate", PROMPT, *common, "--seed", 1, "-o", b)[0] == 0
    assert run_cli(capsys, "generate", PROMPT, *common, "--seed", 2, "-o", c)[0] == 0
    assert run_cli(capsys, "generate", PROMPT, *common, "--seed", 1, "--negative", "a white dress", "-o", d)[0] == 0
    assert pixels(a).shape == (SIZE, SIZE, 3) and a.read_bytes() == b.read_bytes()
    assert not np.array_equal(pixels(a), pixels(c)) and not np.array_equal(pixels(a), pixels(d))
    # A model conditioned on text alone also generates at other multiples of its size multiple (4 here).
    assert run_cli(capsys, "generate", PROMPT, *common, "-n", 2, "--separate", "--height", 8, "--width", 24,
                   "-o", tmp_path / "many.png")[0] == 0
    assert pixels(tmp_path / "many-1.png").shape == (8, 24, 3)


def test_sample_takes_prompts_for_a_text_model(runs, tmp_path, capsys) -> None:
    common = ["sample", runs["txt2img"], "--prompt", PROMPT, "--prompt", "a green shirt", "-n", 4, "--steps", 2,
              "--sampler", "ddim", "--guidance", 3, "--negative", "a blue bag"]
    assert run_cli(capsys, *common, "-o", tmp_path / "a.png")[0] == 0
    assert run_cli(capsys, *common, "-o", tmp_path / "b.png")[0] == 0
    assert pixels(tmp_path / "a.png").shape == (2 * 18 + 2, 2 * 18 + 2, 3)  # one prompt per column
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


# ------------------------------------------------------------------------------------------------ img2img


def test_img2img_runs_the_last_strength_steps_from_the_encoded_image(runs, files, tmp_path, capsys) -> None:
    pipe = load_pipeline(runs["txt2img"])
    seen = []
    out = pipe.image_to_image(files["image"], PROMPT, strength=0.5, steps=4, sampler="euler", generator=0,
                              callback=lambda info: seen.append(float(info["sigma"].reshape(-1)[0])))
    assert seen == pytest.approx(pipe.model.sigmas(4)[2:4].tolist())  # int(4 * 0.5) = 2 of the 4 steps
    assert out.images.shape == (1, 3, SIZE, SIZE)
    init = pipe.encode_images(files["image"])
    # Less strength stays closer to the image's latent.
    weak = pipe.image_to_image(files["image"], PROMPT, strength=0.25, steps=4, generator=0, decode=False).latents
    strong = pipe.image_to_image(files["image"], PROMPT, strength=1.0, steps=4, generator=0, decode=False).latents
    assert float((weak - init).abs().mean()) < float((strong - init).abs().mean())

    common = ["img2img", files["image"], PROMPT, "--model", runs["txt2img"], "--strength", 0.75, "--steps", 4]
    assert run_cli(capsys, *common, "-o", tmp_path / "a.png")[0] == 0
    assert run_cli(capsys, *common, "-o", tmp_path / "b.png")[0] == 0
    assert pixels(tmp_path / "a.png").shape == (SIZE, SIZE, 3)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


# ------------------------------------------------------------------------------------------------ inpainting


def test_inpainting_with_a_text_to_image_model_keeps_the_unmasked_latents(runs, files, tmp_path, capsys) -> None:
    pipe = load_pipeline(runs["txt2img"])
    assert not pipe.is_inpainting_model
    keep = 1 - pipe.latent_mask(to_mask_tensor(files["mask"]))
    image_latents = pipe.encode_images(files["image"])
    for strength in (1.0, 0.5):
        out = pipe.inpaint(files["image"], files["mask"], PROMPT, strength=strength, steps=4, sampler="dpmpp_2m",
                           generator=3)
        assert torch.equal(out.latents * keep, image_latents * keep)
        assert float((out.latents - image_latents).abs().mul(1 - keep).max()) > 0.1  # the rest was repainted
    # --keep-unmasked gives back the original pixels outside the mask, exactly; the masked pixels are the model's.
    common = ["inpaint", files["image"], files["mask"], PROMPT, "--model", runs["txt2img"], "--steps", 3]
    assert run_cli(capsys, *common, "--keep-unmasked", "-o", tmp_path / "kept.png")[0] == 0
    assert run_cli(capsys, *common, "--keep-unmasked", "-o", tmp_path / "kept2.png")[0] == 0
    assert run_cli(capsys, *common, "-o", tmp_path / "plain.png")[0] == 0
    outside = pixels(files["mask"]) < 128
    kept, plain, original = pixels(tmp_path / "kept.png"), pixels(tmp_path / "plain.png"), pixels(files["image"])
    assert np.array_equal(kept[outside], original[outside]) and np.array_equal(kept[~outside], plain[~outside])
    assert not np.array_equal(plain[outside], original[outside])  # the autoencoder's error, which the flag removes
    assert (tmp_path / "kept.png").read_bytes() == (tmp_path / "kept2.png").read_bytes()


def test_inpainting_model_conditions_on_the_masked_image(runs, files, tmp_path, capsys) -> None:
    pipe = load_pipeline(runs["inpaint"])
    assert pipe.is_inpainting_model and pipe.has_text_conditioning
    a = pipe.inpaint(files["image"], files["mask"], PROMPT, steps=3, generator=1, decode=False).latents
    b = pipe.inpaint(files["other"], files["mask"], PROMPT, steps=3, generator=1, decode=False).latents
    assert not torch.equal(a, b)  # the same noise and prompt: the kept image is what differs
    common = ["inpaint", files["image"], files["mask"], PROMPT, "--model", runs["inpaint"], "--steps", 3,
              "--keep-unmasked", "--guidance", 2]
    assert run_cli(capsys, *common, "-o", tmp_path / "a.png")[0] == 0
    assert run_cli(capsys, *common, "-o", tmp_path / "b.png")[0] == 0
    outside = pixels(files["mask"]) < 128
    assert np.array_equal(pixels(tmp_path / "a.png")[outside], pixels(files["image"])[outside])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    # Text-to-image with an inpainting model fills the whole image (the full mask).
    code, _, _ = run_cli(capsys, "generate", PROMPT, "--model", runs["inpaint"], "--steps", 2, "-o", tmp_path / "g.png")
    assert code == 0 and pixels(tmp_path / "g.png").shape == (SIZE, SIZE, 3)


# ------------------------------------------------------------------------------------------------ seg2img, upscale


def test_seg2img_follows_the_class_map(runs, files, tmp_path, capsys) -> None:
    assert torch.equal(read_class_map(files["map"]), read_class_map(files["map_grey"]))
    common = ["seg2img", "--model", runs["seg2img"], "--steps", 3, "--seed", 4]
    for name in ("map", "map_grey", "map2"):
        code, stdout, _ = run_cli(capsys, *common[:1], files[name], *common[1:], "-o", tmp_path / f"{name}.png")
        assert code == 0 and "wrote 1 image" in stdout
    assert pixels(tmp_path / "map.png").shape == (SIZE, SIZE, 3)
    # A palette map and a greyscale map of the same classes give the same image; other classes another one.
    # the same pixels; the PNGs record their inputs' hashes, which differ
    assert np.array_equal(pixels(tmp_path / "map.png"), pixels(tmp_path / "map_grey.png"))
    assert not np.array_equal(pixels(tmp_path / "map.png"), pixels(tmp_path / "map2.png"))
    assert run_cli(capsys, "seg2img", files["map"], "--model", runs["seg2img"], "--steps", 2, "-n", 2, "--guidance",
                   1, "-o", tmp_path / "grid.png")[0] == 0
    assert pixels(tmp_path / "grid.png").shape == (SIZE + 4, 2 * SIZE + 6, 3)


def test_upscale_conditions_on_the_lowres_image(runs, files, tmp_path, capsys) -> None:
    pipe = load_pipeline(runs["upscale"])
    assert pipe.is_upscaler and pipe.lowres_size == 8 and pipe.default_guidance == 1.0
    low = to_image_tensor(files["lowres"])
    a = pipe.upscale(low, steps=3, generator=0).images
    b = pipe.upscale(1 - low, steps=3, generator=0).images
    assert a.shape == (1, 3, SIZE, SIZE) and not torch.equal(a, b)
    # A batch of low-res images without a prompt: one output each, the same as one at a time with its noise.
    both = pipe.upscale(torch.cat([low, 1 - low]), steps=3, latents=torch.randn(2, 4, 8, 8,
                        generator=torch.Generator().manual_seed(0))).images
    assert both.shape == (2, 3, SIZE, SIZE) and not torch.equal(both[0], both[1])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    one = pipe.upscale(1 - low, steps=3, latents=noise[1:]).images
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-5)
    maps = read_class_map(files["map"]).reshape(1, SIZE, SIZE).repeat(3, 1, 1)
    seg = load_pipeline(runs["seg2img"]).segmentation_to_image(maps, steps=2, generator=0).images
    assert seg.shape == (3, 3, SIZE, SIZE)
    common = ["upscale", files["lowres"], "--model", runs["upscale"], "--steps", 3]
    assert run_cli(capsys, *common, "-o", tmp_path / "a.png")[0] == 0
    assert run_cli(capsys, *common, "-o", tmp_path / "b.png")[0] == 0
    assert pixels(tmp_path / "a.png").shape == (SIZE, SIZE, 3)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


# ------------------------------------------------------------------------------------------------ models, errors


def test_the_default_model_is_the_bundled_one(runs, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_generate, "_REPO_ROOT", tmp_path)
    code, _, err = run_cli(capsys, "generate", PROMPT, "--steps", 2)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert cli_generate.DEFAULT_MODEL in err and "--model" in err
    assert "latentdiff train configs/ldm-scenes-txt2img.yaml" in err
    shutil.copytree(runs["txt2img"] / "checkpoints", tmp_path / cli_generate.DEFAULT_MODEL / "checkpoints")
    assert run_cli(capsys, "generate", PROMPT, "--steps", 2, "-o", "out.png")[0] == 0
    assert (tmp_path / "out.png").is_file()


def test_export_float16_halves_the_file_and_samples_the_same(runs, tmp_path, capsys) -> None:
    src = resolve_checkpoint(runs["txt2img"])
    code, out, err = run_cli(capsys, "export", runs["txt2img"], tmp_path / "half", "--dtype", "float16",
                             "--guidance", "2.5")
    assert code == 0, err
    dst = tmp_path / "half" / "model.safetensors"
    assert "wrote" in out and dst.is_file()
    assert 0.45 < dst.stat().st_size / src.stat().st_size < 0.6
    config = json.loads((tmp_path / "half" / "config.json").read_text())
    assert config["sample_guidance"] == 2.5 and config["exported_from"]["dtype"] == "float16"
    assert config["exported_from"]["step"] == 2
    full, half = LatentDiffusionPipeline.from_checkpoint(runs["txt2img"]), LatentDiffusionPipeline.from_checkpoint(dst)
    assert half.default_guidance == 2.5
    a = full.text_to_image(PROMPT, steps=3, sampler="ddim", generator=0).images
    b = half.text_to_image(PROMPT, steps=3, sampler="ddim", generator=0).images
    # float16 storage rounds each weight by at most 2^-11 relative; through 3 steps of this random-weight model
    # that moves pixels by ~5e-3 on average (the bundled models: see docs/scenes.md).
    assert float((a - b).abs().mean()) < 1e-2 and float((a - b).abs().max()) < 0.1
    assert not torch.equal(a, b)


def test_export_refuses_nan_weights_and_bad_dtypes(runs, tmp_path, capsys) -> None:
    bad = tmp_path / "bad" / "model.safetensors"
    bad.parent.mkdir()
    file = resolve_checkpoint(runs["seg2img"])
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    weights = load_file(str(file))
    key = next(k for k in weights if k.startswith("model.diffusion_model."))
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, str(bad), metadata=metadata)
    code, _, err = run_cli(capsys, "export", bad, tmp_path / "out")
    assert code == 2 and "NaN or infinite weights" in err and key in err
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert run_cli(capsys, "export", tmp_path / "nowhere", tmp_path / "out")[0] == 2


def test_export_swaps_in_a_fine_tuned_decoder_and_refuses_another_encoder(runs, tmp_path, capsys) -> None:
    ae_file = resolve_checkpoint(Path(json.loads((resolve_checkpoint(runs["txt2img"]).parent / "config.json")
                                                 .read_text())["model"]["first_stage"]))
    with safe_open(str(ae_file), framework="pt") as f:
        metadata = f.metadata()
    ae = load_file(str(ae_file))
    g = torch.Generator().manual_seed(0)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) if k.startswith("decoder.") else v for k, v in ae.items()}
    save_checkpoint(tmp_path / "tuned", 9, tuned, json.loads(metadata["latentdiff_config"]))
    code, _, err = run_cli(capsys, "export", runs["txt2img"], tmp_path / "out", "--first-stage", tmp_path / "tuned")
    assert code == 0, err
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, v in tuned.items():
        assert torch.equal(out["first_stage_model." + k], v), k
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["exported_from"]["first_stage_step"] == 9
    other = dict(tuned, **{k: v + 1 for k, v in ae.items() if k.startswith("encoder.conv_in.")})
    save_checkpoint(tmp_path / "other", 9, other, json.loads(metadata["latentdiff_config"]))
    code, _, err = run_cli(capsys, "export", runs["txt2img"], tmp_path / "out2", "--first-stage", tmp_path / "other")
    assert code == 2 and "has another encoder than the one this model was trained on" in err
    assert "encoder.conv_in" in err and not (tmp_path / "out2").exists()


def test_export_adds_a_mask_decoder_that_inpainting_uses(runs, files, tmp_path, capsys) -> None:
    ae_file = resolve_checkpoint(Path(json.loads((resolve_checkpoint(runs["txt2img"]).parent / "config.json")
                                                 .read_text())["model"]["first_stage"]))
    with safe_open(str(ae_file), framework="pt") as f:
        ae_config = json.loads(f.metadata()["latentdiff_config"])
    plain = load_file(str(ae_file))
    masked_config = dict(ae_config, model=dict(ae_config["model"], mask_decoder=True))
    model = Autoencoder(AutoencoderConfig(**masked_config["model"]))
    g = torch.Generator().manual_seed(1)
    weights = dict(plain)
    for k, v in model.mask_decoder.state_dict().items():  # as if trained: cond_out no longer zero
        weights["mask_decoder." + k] = (plain["decoder." + k[8:]].clone() if k.startswith("decoder.")
                                        else 0.1 * torch.randn(v.shape, generator=g))
    save_checkpoint(tmp_path / "masked_ae", 5, weights, masked_config)
    code, _, err = run_cli(capsys, "export", runs["txt2img"], tmp_path / "out", "--first-stage", tmp_path / "masked_ae")
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model"]["first_stage_config"]["mask_decoder"] is True
    before = LatentDiffusionPipeline.from_checkpoint(runs["txt2img"])
    after = LatentDiffusionPipeline.from_checkpoint(tmp_path / "out")
    assert after.has_mask_decoder and not before.has_mask_decoder
    image, mask = to_image_tensor(files["image"]), to_mask_tensor(files["mask"])
    kw = dict(steps=2, generator=0, progress=False)
    with_it = after.inpaint(image, mask, PROMPT, **kw).images
    without = after.inpaint(image, mask, PROMPT, mask_decoder=False, **kw).images
    assert torch.equal(without, before.inpaint(image, mask, PROMPT, **kw).images)  # plain decoder: as before
    assert (with_it - without).abs().mean() > 1e-3
    # The same latents, decoded with the known pixels: what the mask decoder is asked for.
    latents = after.inpaint(image, mask, PROMPT, decode=False, **kw).latents
    assert torch.equal(with_it, after.decode_latents(latents, image, mask))
    # the CLI flag picks the plain decoder
    code, _, err = run_cli(capsys, "inpaint", files["image"], files["mask"], PROMPT, "--model", tmp_path / "out",
                           "--steps", "2", "--seed", "0", "--no-mask-decoder", "-o", tmp_path / "plain.png")
    assert code == 0, err
    # a mask-decoder autoencoder with another encoder is refused like any other
    other = dict(weights, **{k: v + 1 for k, v in plain.items() if k.startswith("encoder.conv_in.")})
    save_checkpoint(tmp_path / "other", 5, other, masked_config)
    code, _, err = run_cli(capsys, "export", runs["txt2img"], tmp_path / "out2", "--first-stage", tmp_path / "other")
    assert code == 2 and "has another encoder" in err


def _sd_model(folder: Path) -> Path:
    """A tiny Stable Diffusion model (unconditional UNet + VAE) in the native format that `convert` writes."""
    from latentdiff.diffusion.unet import UNetConfig, UNetModel
    from latentdiff.formats import StableDiffusionComponents, save_native

    unet = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(2,), num_heads=2, num_head_channels=-1, context_dim=None)
    vae = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, resolution=SIZE)
    save_native(StableDiffusionComponents(unet=UNetModel(unet).state_dict(), unet_config=unet,
                                          vae=Autoencoder(vae).state_dict(), vae_config=vae, image_size=SIZE), folder)
    return folder


def test_load_pipeline_tells_native_from_stable_diffusion(runs, tmp_path) -> None:
    assert isinstance(load_pipeline(resolve_checkpoint(runs["seg2img"])), LatentDiffusionPipeline)  # the file
    assert isinstance(load_pipeline(_sd_model(tmp_path / "sd")), StableDiffusionPipeline)


@pytest.fixture(scope="module")
def broken(runs, tmp_path_factory) -> dict[str, Path]:
    """A checkpoint whose weights do not fit its config, and a Stable Diffusion model."""
    root = tmp_path_factory.mktemp("broken")
    file = resolve_checkpoint(runs["seg2img"])
    bad = root / "bad"
    shutil.copytree(file.parent, bad)
    with safe_open(str(bad / file.name), framework="pt") as f:
        metadata = f.metadata()
    weights = load_file(str(bad / file.name))
    weights["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 5, 5)
    save_file(weights, str(bad / file.name), metadata=metadata)
    return {"bad": bad, "sd": _sd_model(root / "sd")}


ERRORS = [  # (argv, what the one line says); {name} is a run, a file or a broken model
    (["generate", "x", "--model", "{txt2img}", "--sampler", "magic"], "unknown sampler 'magic'"),
    (["generate", "x", "--model", "{txt2img}", "-n", "0"], "-n must be a whole number in [1, 10000], got 0"),
    (["generate", "x", "--model", "{txt2img}", "--height", "18"], "multiples of 4"),
    (["generate", "x", "--model", "{txt2img}", "--dtype", "bf16"], "run in float32"),
    (["generate", "x", "--model", "{seg2img}"], "has no text conditioning (conditioning: concat on class maps)"),
    (["generate", "--model", "{upscale}"], "needs a low-res image for every image"),
    (["generate", "x", "--model", "{nowhere}"], "checkpoint not found"),
    (["generate", "x", "--model", "{bad}"], "does not fit the latent diffusion model"),
    (["img2img", "{image}", "x", "--model", "{txt2img}", "--strength", "0"], "--strength must be in (0, 1]"),
    (["img2img", "{odd}", "x", "--model", "{txt2img}"], "init image size 18x18: both sides must be multiples of 4"),
    (["img2img", "{nowhere}", "x", "--model", "{txt2img}"], "image not found"),
    (["inpaint", "{image}", "{mask_small}", "x", "--model", "{txt2img}"], "must be the same size"),
    (["inpaint", "{odd}", "{odd}", "x", "--model", "{inpaint}"], "the image is 18x18 but this model makes 16x16"),
    (["inpaint", "{image}", "{mask}", "x", "--model", "{txt2img}", "--strength", "1.5"], "--strength must be in"),
    (["seg2img", "{map}", "--model", "{txt2img}"], "takes no class map (conditioning: crossattn on captions)"),
    (["seg2img", "{map}", "a dress", "--model", "{seg2img}"], "has no text conditioning"),
    (["seg2img", "{big_map}", "--model", "{seg2img}"], "the class map is 20x20 but this model makes 16x16"),
    (["seg2img", "{bad_map}", "--model", "{seg2img}"], "holds class 11, but this model knows 11 classes (0 to 10)"),
    (["seg2img", "{image}", "--model", "{seg2img}"], "is a colour image (mode RGB); a class map is a palette"),
    (["seg2img", "{nowhere}", "--model", "{seg2img}"], "class map not found"),
    (["seg2img", "{map}", "--model", "{sd}"], "seg2img runs on latentdiff models"),
    (["seg2img", "{map}"], "no --model given, and the bundled model models/scenes-seg2img"),
    (["upscale", "{image}", "--model", "{upscale}"], "the low-res image is 16x16 but this model upscales 8x8"),
    (["upscale", "{lowres}", "--model", "{seg2img}"], "is not an upscaler (conditioning: concat on class maps)"),
    (["upscale", "{lowres}", "--model", "{upscale}", "--guidance", "2"], "trained without conditioning dropout"),
    (["sample", "{seg2img}", "--prompt", "x"], "--prompt/--negative given, but this model has no text"),
    (["sample", "{txt2img}", "--class", "1"], "this model is not class-conditional (conditioning: crossattn)"),
    (["sample", "{txt2img}", "--guidance", "2"], "--guidance needs --prompt (or --negative) with a text model"),
]


@pytest.mark.parametrize("argv,message", ERRORS, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(ERRORS)])
def test_errors_are_one_line(argv, message, runs, files, broken, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli_generate, "_REPO_ROOT", tmp_path)  # no bundled models, wherever the tests run
    monkeypatch.chdir(tmp_path)
    names = {**{k: str(v) for k, v in {**runs, **files, **broken}.items()}, "nowhere": str(tmp_path / "nowhere")}
    code, _, err = run_cli(capsys, *[a.format(**names) for a in argv])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("latentdiff: error:"), err
    assert message in lines[0], lines[0]
