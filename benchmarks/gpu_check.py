"""GPU smoke check and timings for the first stage (run on a CUDA machine; prints a table).

    python benchmarks/gpu_check.py [--out DIR]

1. The SD kl-f8 VAE (random weights) gives the same latents and images on the GPU as on the CPU (fp32),
   and close ones under bf16 autocast.
2. Encode/decode throughput at 256 and 512 px on the GPU, fp32 and bf16.
3. A short `latentdiff train` run on the GPU (bf16 autocast, GAN on) and `eval-autoencoder` on its output.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from latentdiff.autoencoder.model import Autoencoder
from latentdiff.cli import main as cli
from latentdiff.config import load_config, read_yaml
from latentdiff.device import select_device
from latentdiff.train.autoencoder import AutoencoderExperiment


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/gpu-check")
    args = parser.parse_args()
    device = select_device("auto")
    assert device.type != "cpu", "no GPU visible"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}

    exp = load_config(AutoencoderExperiment, read_yaml("configs/sd-kl-f8.yaml"))
    torch.manual_seed(0)
    cpu_model = Autoencoder(exp.model).eval()
    gpu_model = Autoencoder(exp.model).eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.to(device)
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        z_cpu = cpu_model.encode(x).mode()
        y_cpu = cpu_model.decode(z_cpu)
        z_gpu = gpu_model.encode(x.to(device)).mode()
        y_gpu = gpu_model.decode(z_gpu)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            z_bf = gpu_model.encode(x.to(device)).mode()
            y_bf = gpu_model.decode(z_bf)
    report["fp32_latent_rel_err"] = rel_err(z_gpu, z_cpu)
    report["fp32_image_rel_err"] = rel_err(y_gpu, y_cpu)
    report["bf16_latent_rel_err"] = rel_err(z_bf, z_cpu)
    report["bf16_image_rel_err"] = rel_err(y_bf, y_cpu)

    timings = {}
    for size in (256, 512):
        for precision in ("fp32", "bf16"):
            xs = torch.rand(4, 3, size, size, device=device) * 2 - 1
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                for _ in range(2):
                    gpu_model.decode(gpu_model.encode(xs).mode())
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                for _ in range(5):
                    z = gpu_model.encode(xs).mode()
                torch.cuda.synchronize(device)
                enc = (time.perf_counter() - start) / 5
                start = time.perf_counter()
                for _ in range(5):
                    gpu_model.decode(z)
                torch.cuda.synchronize(device)
                dec = (time.perf_counter() - start) / 5
            timings[f"{size}px_{precision}"] = {"encode_img_per_s": 4 / enc, "decode_img_per_s": 4 / dec}
    report["sd_kl_f8_throughput_batch4"] = timings
    report["peak_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30

    run = out / "train"
    start = time.perf_counter()
    code = cli(["train", "configs/kl-f4-photos64.yaml", "train.steps=300", "loss.disc_start=150", "train.threads=0",
                "train.precision=bf16", "train.batch_size=32", f"train.out_dir={run}", "train.time_limit_minutes=4"])
    report["train_exit"] = code
    report["train_seconds_300_steps_bf16_batch32"] = time.perf_counter() - start
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    report["train_last_log"] = log[-1]
    code = cli(["eval-autoencoder", str(run), "--limit", "256", "-o", str(out / "eval.json")])
    report["eval_exit"] = code
    report["eval"] = json.loads((out / "eval.json").read_text())
    text = json.dumps(report, indent=2)
    print(text)
    (out / "report.json").write_text(text)


if __name__ == "__main__":
    main()
