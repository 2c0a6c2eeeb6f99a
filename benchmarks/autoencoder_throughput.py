"""Throughput of the first-stage configs on this machine: a training step and encode/decode, as a table.

    python benchmarks/autoencoder_throughput.py [--threads N] [--configs kl-f4-fmnist vq-f4-fmnist ...]

Each config is timed with the batch size and image size it trains with; the loss (perceptual trunk,
discriminator) is included in the training step, because that is what a user's run pays for.
"""

from __future__ import annotations

import argparse
import time

import torch

from latentdiff.autoencoder.losses import AutoencoderLoss
from latentdiff.autoencoder.model import Autoencoder
from latentdiff.config import load_config, read_yaml
from latentdiff.train.autoencoder import AutoencoderExperiment


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench(name: str, repeats: int) -> dict[str, float | str]:
    exp = load_config(AutoencoderExperiment, read_yaml(f"configs/{name}.yaml"))
    torch.manual_seed(0)
    model = Autoencoder(exp.model)
    loss_fn = AutoencoderLoss(exp.loss, exp.model.out_ch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    b, s, c = exp.train.batch_size, exp.data.image_size, exp.data.channels
    x = torch.rand(b, c, s, s) * 2 - 1

    def train_step(gan: bool) -> None:
        out = model(x)
        step = exp.loss.disc_start if gan else -1
        loss, _ = loss_fn.generator_loss(x, out.reconstruction, out.reg_loss, step, model.last_layer,
                                         exp.model.regularizer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if gan and loss_fn.discriminator is not None:
            d_loss, _ = loss_fn.discriminator_step_loss(x, out.reconstruction.detach())
            d_loss.backward()

    @torch.no_grad()
    def encode_decode() -> None:
        model.eval()
        z = model.encode(x)
        model.decode(z.mode() if exp.model.regularizer == "kl" else z)
        model.train()

    step = timed(lambda: train_step(False), repeats)
    step_gan = timed(lambda: train_step(True), repeats) if loss_fn.discriminator is not None else float("nan")
    codec = timed(encode_decode, repeats)
    return {"config": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "batch": b,
            "size": s, "step_s": step, "step_gan_s": step_gan, "codec_img_per_s": b / codec}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=["kl-f4-fmnist", "vq-f4-fmnist", "kl-f4-photos64"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench(name, args.repeats) for name in args.configs]
    print(f"threads: {args.threads}, torch {torch.__version__}")
    print(f"| {'config':<16} | params (M) | batch | size | train step (s) | step with GAN (s) "
          "| encode+decode (img/s) |")
    print(f"|{'-' * 18}|-----------:|------:|-----:|---------------:|------------------:|----------------------:|")
    for r in rows:
        print(f"| {r['config']:<16} | {r['params_M']:10.2f} | {r['batch']:5d} | {r['size']:4d} | {r['step_s']:14.3f} "
              f"| {r['step_gan_s']:17.3f} | {r['codec_img_per_s']:21.1f} |")


if __name__ == "__main__":
    main()
