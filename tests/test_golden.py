"""Known answers recorded before the architecture change (issue 11), so that a refactor cannot change what users see.

Two kinds, both made by ``python tests/test_golden.py --write`` (run it only to accept a deliberate change):

- **Images**: a fixed list of CLI commands on the bundled models (every generating verb, every sampler, guidance,
  negative prompts, img2img strength, inpainting with and without the mask decoder, the dedicated inpainting
  model, seg2img, upscale, ``sample --karras``) and on a tiny random Stable Diffusion single file built from a
  fixed seed. Each PNG must come back byte for byte.
- **Training**: each bundled scenes config (and the class-conditional one) trained for 20 steps on a tiny first
  stage from a fixed seed. The weights' fingerprints (per tensor: sum, sum of absolute values and 8 values at
  fixed positions) and the logged losses must match: a changed initialisation order or a changed random draw in
  the conditioner, the noise or the dropout moves them far beyond the tolerance, which only absorbs the last-bit
  differences between CPUs.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
PROMPT = "a red sneaker on the left and a blue bag on the right"
NATIVE_SAMPLERS = ("ddim", "plms", "ddpm", "euler", "euler_ancestral", "heun", "dpmpp_2m")

# name: argv after `latentdiff` (the output path is appended as -o); {in} is the golden inputs folder, {sd} the
# tiny Stable Diffusion file.
IMAGE_COMMANDS: dict[str, list[str]] = {
    "generate-default": ["generate", PROMPT, "--steps", "6", "--seed", "1"],
    "generate-n3-negative": ["generate", PROMPT, "-n", "3", "--steps", "4", "--seed", "2", "--negative",
                             "a green shirt", "--guidance", "4.5"],
    **{f"generate-{s}": ["generate", "an orange boot at the top", "--sampler", s, "--steps", "5", "--seed", "3"]
       for s in NATIVE_SAMPLERS},
    "generate-unguided": ["generate", "a white dress", "--guidance", "1", "--steps", "4", "--seed", "4"],
    "img2img-default": ["img2img", "{in}/init.png", PROMPT, "--strength", "0.7", "--steps", "6", "--seed", "5"],
    "img2img-plms": ["img2img", "{in}/init.png", "a cyan bag", "--strength", "0.6", "--sampler", "plms",
                     "--steps", "8", "--seed", "6"],
    "img2img-euler-a": ["img2img", "{in}/init.png", "a cyan bag", "--strength", "0.5", "--sampler", "euler_ancestral",
                        "--steps", "8", "--seed", "6"],
    "inpaint-default": ["inpaint", "{in}/init.png", "{in}/mask.png", "a yellow coat on the right", "--steps", "6",
                        "--seed", "7"],
    "inpaint-no-mask-decoder": ["inpaint", "{in}/init.png", "{in}/mask.png", "a yellow coat on the right",
                                "--steps", "6", "--seed", "7", "--no-mask-decoder", "--keep-unmasked"],
    "inpaint-strength-plms": ["inpaint", "{in}/init.png", "{in}/mask.png", "a purple trouser on the right",
                              "--steps", "8", "--seed", "8", "--strength", "0.6", "--sampler", "plms"],
    "inpaint-model": ["inpaint", "{in}/init.png", "{in}/mask.png", "a yellow coat on the right", "--steps", "6",
                      "--seed", "9", "--model", "models/scenes-inpaint"],
    "inpaint-model-ddim-strength": ["inpaint", "{in}/init.png", "{in}/mask.png", "a red sandal on the right",
                                    "--steps", "6", "--seed", "9", "--model", "models/scenes-inpaint", "--sampler",
                                    "ddim", "--strength", "0.8"],
    "seg2img-default": ["seg2img", "{in}/map.png", "--steps", "6", "--seed", "10"],
    "seg2img-n2-heun": ["seg2img", "{in}/map.png", "--steps", "4", "--seed", "11", "-n", "2", "--sampler", "heun"],
    "upscale-default": ["upscale", "{in}/lowres.png", "--steps", "6", "--seed", "12"],
    "upscale-euler": ["upscale", "{in}/lowres.png", "--steps", "5", "--seed", "12", "--sampler", "euler"],
    "sample-karras": ["sample", "models/scenes-txt2img", "-n", "4", "--steps", "5", "--seed", "13", "--karras",
                      "--prompt", "a red shirt", "--prompt", "a blue boot on the left", "--guidance", "3"],
    "sample-ddim": ["sample", "models/scenes-txt2img", "-n", "2", "--steps", "4", "--seed", "14", "--sampler",
                    "ddim", "--prompt", "a green bag"],
    **{f"sd-generate-{s}": ["generate", "a photo of a cat", "--model", "{sd}", "--sampler", s, "--steps", "4",
                            "--seed", "15", "--height", "32", "--width", "32"] for s in NATIVE_SAMPLERS},
    "sd-img2img-plms": ["img2img", "{in}/init.png", "a dog", "--model", "{sd}", "--sampler", "plms", "--steps", "6",
                        "--strength", "0.6", "--seed", "16"],
    "sd-img2img-ddim": ["img2img", "{in}/init.png", "a dog", "--model", "{sd}", "--sampler", "ddim", "--steps", "6",
                        "--strength", "0.6", "--seed", "16"],
    "sd-inpaint-dpmpp": ["inpaint", "{in}/init.png", "{in}/mask.png", "a dog", "--model", "{sd}", "--steps", "4",
                         "--seed", "17", "--negative", "blurry"],
    "sd-inpaint-plms-strength": ["inpaint", "{in}/init.png", "{in}/mask.png", "a dog", "--model", "{sd}",
                                 "--steps", "6", "--seed", "17", "--sampler", "plms", "--strength", "0.7"],
}

# name: (config, overrides); trained 20 steps on the tiny scenes first stage (or the 1-channel one for fmnist)
TRAIN_COMMON = ["train.steps=20", "train.batch_size=4", "train.warmup_steps=0", "train.lr=1e-3", "train.log_every=1",
                "train.ckpt_every=20", "train.sample_every=20", "sample_images=2", "sample_steps=2", "train.threads=1",
                "train.time_limit_minutes=0",
                "train.device=cpu", "data.image_size=16", "data.limit=32", "model.unet.model_channels=32",
                "ema_decay=0.9"]
TRAIN_RUNS: dict[str, tuple[str, list[str]]] = {
    "txt2img": ("configs/ldm-scenes-txt2img.yaml", ["model.conditioner.text.width=32", "model.unet.context_dim=32",
                                                    "model.conditioner.text.layers=1",
                                                    "model.conditioner.text_dropout=0.5"]),
    "seg2img": ("configs/ldm-scenes-seg2img.yaml", []),
    "inpaint": ("configs/ldm-scenes-inpaint.yaml", ["model.conditioner.text.width=32", "model.unet.context_dim=32",
                                                    "model.conditioner.text.layers=1"]),
    "upscale": ("configs/ldm-scenes-upscale.yaml", []),
    "class": ("configs/ldm-fmnist-class.yaml", ["model.schedule.num_timesteps=50"]),
}


def _write_inputs(folder: Path) -> None:
    from latentdiff.data.scenes import FashionScenes
    from latentdiff.pipelines.images import save_class_map

    scene = FashionScenes("test", image_size=32)[3]
    pixels = ((scene["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    Image.fromarray(pixels).save(folder / "init.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[6:26, 16:30] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    save_class_map(scene["class_map"], folder / "map.png")
    Image.fromarray(pixels).resize((8, 8), Image.BICUBIC).save(folder / "lowres.png")


def tiny_sd_file(folder: Path) -> Path:
    """A tiny random SD v1 single file (CLIP tokenizer from open_clip's vocabulary) from a fixed seed."""
    import transformers

    from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
    from latentdiff.diffusion.unet import UNetConfig, UNetModel
    from latentdiff.formats.stable_diffusion import StableDiffusionComponents, save_original

    path = folder / "tiny-sd.safetensors"
    if path.is_file():
        return path
    torch.manual_seed(0)
    unet_cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                          attention_resolutions=(1, 2), num_heads=2, num_head_channels=-1, context_dim=32,
                          use_spatial_transformer=True, transformer_depth=1)
    vae_cfg = AutoencoderConfig(in_channels=3, out_ch=3, resolution=32, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                                z_channels=4, embed_dim=4, norm_groups=8, double_z=True)
    unet, vae = UNetModel(unet_cfg), Autoencoder(vae_cfg)
    with torch.no_grad():  # zero-initialised output layers would hide the conditioning
        for p in [*unet.parameters(), *vae.parameters()]:
            p.add_(0.05 * torch.randn(p.shape))
    text_cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                           hidden_act="quick_gelu")
    text = transformers.CLIPTextModel(text_cfg).state_dict()
    comps = StableDiffusionComponents(
        unet=dict(unet.state_dict()), unet_config=unet_cfg, vae=dict(vae.state_dict()), vae_config=vae_cfg,
        text_encoder={(k if k.startswith("text_model.") else "text_model." + k): v.clone() for k, v in text.items()},
        text_encoder_layout="hf", text_encoder_config=text_cfg.to_dict(), text_encoder_output_layer="last",
        prediction_type="epsilon", image_size=32)
    save_original(comps, path)
    return path


def run_image_command(name: str, out: Path, inputs: Path, sd: Path) -> None:
    from latentdiff.cli import main

    argv = [a.format(**{"in": inputs, "sd": sd}) for a in IMAGE_COMMANDS[name]]
    code = main([*argv, "-o", str(out)])
    assert code == 0, f"{name}: latentdiff {' '.join(argv)} exited {code}"


def _tiny_first_stage(folder: Path, channels: int) -> Path:
    from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
    from latentdiff.config import to_dict
    from latentdiff.io.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = AutoencoderConfig(in_channels=channels, out_ch=channels, resolution=16, ch=16, ch_mult=(1, 2),
                            num_res_blocks=1, z_channels=4, embed_dim=4, norm_groups=8)
    save_checkpoint(folder, 5, Autoencoder(cfg).state_dict(), {"task": "autoencoder", "model": to_dict(cfg)})
    return folder


def train_fingerprint(name: str, root: Path) -> dict:
    from latentdiff.cli import main

    config, overrides = TRAIN_RUNS[name]
    channels = 1 if "fmnist" in config else 3
    first_stage = _tiny_first_stage(root / f"ae{channels}", channels)
    out = root / name
    code = main(["train", config, *TRAIN_COMMON, *overrides, f"model.first_stage={first_stage}",
                 f"train.out_dir={out}"])
    assert code == 0
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    weights = load_file(str(ckpt / "model.safetensors"))
    state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    tensors = {**weights, **{f"raw.{k}": v for k, v in state["model"].items()}}
    prints = {}
    for key, value in sorted(tensors.items()):
        flat = value.detach().double().flatten()
        idx = torch.linspace(0, flat.numel() - 1, min(8, flat.numel())).round().long()
        prints[key] = [float(flat.sum()), float(flat.abs().sum()), *[float(v) for v in flat[idx]]]
    with open(out / "log.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    return {"weights": prints, "losses": losses}


# ---------------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def sd_file(tmp_path_factory) -> Path:
    return tiny_sd_file(tmp_path_factory.mktemp("golden_sd"))


@pytest.mark.parametrize("name", list(IMAGE_COMMANDS))
def test_images_are_byte_identical_to_the_recorded_ones(name, sd_file, tmp_path, capsys) -> None:
    out = tmp_path / f"{name}.png"
    run_image_command(name, out, GOLDEN / "inputs", sd_file)
    want = GOLDEN / "images" / f"{name}.png"
    got_pixels, want_pixels = np.asarray(Image.open(out)), np.asarray(Image.open(want))
    assert got_pixels.shape == want_pixels.shape
    diff = np.abs(got_pixels.astype(int) - want_pixels.astype(int))
    assert out.read_bytes() == want.read_bytes(), (
        f"{name}: the PNG differs from the recorded one (max pixel difference {diff.max()}, "
        f"{int((diff > 0).sum())} values)")


@pytest.mark.parametrize("name", list(TRAIN_RUNS))
def test_twenty_training_steps_give_the_recorded_weights(name, tmp_path, capsys) -> None:
    got = train_fingerprint(name, tmp_path)
    want = json.loads((GOLDEN / "train" / f"{name}.json").read_text())
    assert sorted(got["weights"]) == sorted(want["weights"]), "the checkpoint's tensor names changed"
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-4, atol=1e-6)
    for key in want["weights"]:
        np.testing.assert_allclose(got["weights"][key], want["weights"][key], rtol=1e-4, atol=1e-5, err_msg=key)


def _write_all() -> None:
    import shutil
    import tempfile

    torch.set_num_threads(1)
    for sub in ("inputs", "images", "train"):
        (GOLDEN / sub).mkdir(parents=True, exist_ok=True)
    _write_inputs(GOLDEN / "inputs")
    with tempfile.TemporaryDirectory() as tmp:
        sd = tiny_sd_file(Path(tmp))
        for name in IMAGE_COMMANDS:
            run_image_command(name, GOLDEN / "images" / f"{name}.png", GOLDEN / "inputs", sd)
        for name in TRAIN_RUNS:
            root = Path(tmp) / "train"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            (GOLDEN / "train" / f"{name}.json").write_text(json.dumps(train_fingerprint(name, root)))


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_golden.py --write   (records the known answers; see the docstring)")
    _write_all()
