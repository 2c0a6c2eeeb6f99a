"""Fine-tuning throughput and peak memory of a full-size SD v1.5 (random weights): LoRA and full fine-tuning.

Issue 12 asks for these numbers on a lent GPU machine: a random-weight SD v1.5 (our initialisation; the weights do not
change the cost of a step) fine-tuned for some hundred steps with LoRA and with full fine-tuning in bf16, reported
as images/s and peak memory. This script makes everything it needs in a scratch folder (a diffusers folder with
SD v1.5's shapes, a captioned folder of random images at the training size), runs ``latentdiff train`` in-process
for each setting and prints one table row per setting:

- ``images/s``: the global batch times the steps after the warm-up steps, over their wall time (from log.csv's
  ``seconds`` column, so model building and the latent cache do not count);
- ``peak GiB``: ``torch.cuda.max_memory_allocated`` on CUDA, else the process's peak resident set (VmHWM, which then
  includes everything the process ever held; compare CPU rows with each other only);
- ``loss``: the logged loss of the last row (every setting starts from the same weights and draws the same noise,
  so the fp32/bf16 rows show what the precision changes).

Commands (from the repository root):

    # a lent GPU: 300 steps each of LoRA (rank 4, attention) and full fine-tuning, bf16, 512 px, batch 1
    python benchmarks/finetune_gpu.py --steps 300 --size 512 --batch 1 --precision bf16
    # with gradient checkpointing and 8-bit AdamW (bitsandbytes) for the full fine-tune, as diffusers' README runs it
    python benchmarks/finetune_gpu.py --steps 300 --gradient-checkpointing --optimizer adamw8bit
    # smoke test on a CPU: SD's structure at a tiny width, 64 px, 6 steps (about a minute on 2 cores)
    python benchmarks/finetune_gpu.py --tiny --steps 6 --warmup 2 --size 64 --device cpu --precision fp32

diffusers' own scripts (examples/text_to_image/train_text_to_image{,_lora}.py) are not part of the diffusers wheel,
so they cannot be run side by side here; compare with their published settings by hand and say which is which.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig  # noqa: E402
from latentdiff.conditioning.tokenizer import CLIPTokenizer  # noqa: E402
from latentdiff.config import from_dict, load_config, read_yaml  # noqa: E402
from latentdiff.diffusion.unet import UNetConfig, UNetModel  # noqa: E402
from latentdiff.formats.diffusers_pipeline import save_diffusers  # noqa: E402
from latentdiff.formats.stable_diffusion import StableDiffusionComponents  # noqa: E402
from latentdiff.train.diffusion import DiffusionExperiment, DiffusionTrainer  # noqa: E402


def make_base(folder: Path, tiny: bool, size: int) -> Path:
    """A diffusers folder with SD v1.5's shapes (or SD's structure at a tiny width), seeded random weights."""
    torch.manual_seed(0)
    if tiny:
        unet_cfg = UNetConfig.sd_v1(model_channels=32, context_dim=64, num_heads=8)
        vae_cfg = AutoencoderConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4,
                                    resolution=size, norm_groups=8)
        text_cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                               hidden_act="quick_gelu")
    else:
        unet_cfg = UNetConfig.sd_v1()
        vae_cfg = from_dict(AutoencoderConfig, read_yaml(ROOT / "configs" / "sd-kl-f8.yaml")["model"])
        text_cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                               num_hidden_layers=12, num_attention_heads=12,
                                               max_position_embeddings=77, hidden_act="quick_gelu")
    unet, vae = UNetModel(unet_cfg), Autoencoder(vae_cfg)
    with torch.no_grad():  # zero-initialised output layers get small values, so every layer's gradient flows
        for p in unet.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(0.02 * torch.randn(p.shape))
    text = transformers.CLIPTextModel(text_cfg).state_dict()
    comps = StableDiffusionComponents(
        unet=dict(unet.state_dict()), unet_config=unet_cfg, vae=dict(vae.state_dict()), vae_config=vae_cfg,
        text_encoder={(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text.items()},
        text_encoder_layout="hf", text_encoder_config=text_cfg.to_dict(), text_encoder_output_layer="last",
        prediction_type="epsilon", image_size=size,
        tokenizer_dir=CLIPTokenizer().save_folder(folder / "tokenizer"))
    return save_diffusers(comps, folder / "base")


def make_images(folder: Path, n: int, size: int) -> Path:
    """``n`` random RGB images with captions (image.png + image.txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(f"a photo of item {i}")
    return folder


def run_setting(name: str, base: Path, images: Path, out: Path, args: argparse.Namespace) -> dict:
    lora = {"rank": args.rank, "alpha": args.rank, "targets": "attention"} if name == "lora" else {"rank": 0}
    data = {"task": "diffusion", "init_from": str(base), "lora": lora, "cache_latents": False,
            "data": {"path": str(images), "image_size": args.size, "channels": 3},
            "train": {"out_dir": str(out / name), "steps": args.steps, "batch_size": args.batch,
                      "lr": 1e-4 if name == "lora" else 1e-5, "betas": [0.9, 0.999], "log_every": 1,
                      "ckpt_every": 0, "sample_every": 0, "warmup_steps": 0, "device": args.device,
                      "precision": args.precision, "gradient_checkpointing": args.gradient_checkpointing,
                      "optimizer": args.optimizer if name == "full" else "adamw"},
            "sample_images": 1, "sample_steps": 1}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    DiffusionTrainer(load_config(DiffusionExperiment, data, [])).run()
    with (out / name / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    first, last = rows[args.warmup - 1], rows[-1]
    seconds = float(last["seconds"]) - float(first["seconds"])
    steps = int(last["step"]) - int(first["step"])
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM")) / 2**20
    return {"setting": name, "images_per_s": steps * args.batch / seconds, "peak_gib": peak,
            "loss": float(last["loss"]), "precision": args.precision, "size": args.size, "batch": args.batch,
            "gradient_checkpointing": args.gradient_checkpointing, "optimizer": data["train"]["optimizer"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the throughput (default 10)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4, as diffusers' LoRA example)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw")
    p.add_argument("--settings", default="lora,full")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="SD's structure at a tiny width (a smoke test)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    if not 1 <= args.warmup < args.steps:
        p.error("--warmup must be at least 1 and below --steps")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_base(root, args.tiny, args.size)
        images = make_images(root / "images", max(40, args.batch * 4), args.size)
        rows = [run_setting(name, base, images, root / "runs", args) for name in args.settings.split(",")]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nSD v1.5{' (tiny)' if args.tiny else ''} fine-tuning on {device}, {args.size} px, batch {args.batch}, "
          f"{args.steps} steps ({args.warmup} warm-up left out)\n")
    print("| setting | precision | grad ckpt | optimizer | images/s | peak GiB | last loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['precision']} | {r['gradient_checkpointing']} | {r['optimizer']} | "
              f"{r['images_per_s']:.2f} | {r['peak_gib']:.2f} | {r['loss']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
