"""Stable Diffusion v1.5 with our modules against diffusers / transformers: same weights, same machine, one run.

SD v1.5's UNet (``UNetConfig.sd_v1()``, 860M parameters), the kl-f8 VAE (``configs/sd-kl-f8.yaml``) and the CLIP
ViT-L/14 text encoder (``CLIPTextConfig.sd_v1()``) are built with seeded random weights (our initialisation, the
zero-initialised output layers given small random values, so that no output is trivially zero), and the same
tensors are loaded into diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL`` (through
``latentdiff.formats.diffusers_names``) and transformers' ``CLIPTextModel``. Both sides use scaled-dot-product attention
(diffusers' ``AttnProcessor2_0``, transformers' ``attn_implementation="sdpa"``; ours always), run under
``torch.inference_mode()``, in the same dtype and with the same thread count.

Phases (``--phases``):

- ``unet``: one UNet evaluation of the classifier-free-guidance batch (2 x 4 x s/8 x s/8, 2 x 77 x 768 context)
  at every size of ``--sizes``;
- ``vae``: decoding one latent (1 x 4 x s/8 x s/8) to an s x s image, at every size;
- ``text``: encoding 2 x 77 tokens (the prompt and the empty prompt);
- ``txt2img``: a whole text-to-image call, ``--steps`` DDIM steps with guidance 7.5 (prompt encoding, sampling,
  decoding), at ``--txt2img-size`` (default: the first of ``--sizes``): our ``StableDiffusionPipeline`` against
  diffusers' with ``DDIMScheduler`` and SD's scheduler config; the same seed gives the same image.

Each (implementation, dtype, phase, size) runs in a fresh subprocess, so that memory peaks do not mix. In it the
models are built, then the high-water mark of the resident set is reset (``/proc/self/clear_refs``, Linux) so that
the building does not count; the phase runs once to warm up (a 1-step call for txt2img), then ``--repeats`` times
(``--txt2img-repeats`` for txt2img). Reported: the best and the median wall time (over ``--rounds`` fresh
processes per side, the sides alternating, times ``--repeats``; ratios use the best, the steadiest figure on a
shared machine), the peak RSS (``VmHWM``) over warm-up and repeats, and the growth of the peak above the RSS
before the phase (its activations and workspace). Where the reset is not permitted the peak includes the building
(the header says so). A column compares the two outputs (the largest difference over 512 sampled values, relative
to the largest value): both sides computed the same thing.

Command lines (from the repository root):

    # the full benchmark, fp32 and bf16, 512 and 256 px (long: tens of minutes of CPU on 16 cores)
    python benchmarks/sd_vs_diffusers.py --dtype both --json sd_vs_diffusers.json
    # the same with an explicit thread count
    python benchmarks/sd_vs_diffusers.py --threads 16 --dtype both --json sd_vs_diffusers.json
    # one real phase, cheaply: the UNet step at 256 px in fp32, one repeat
    python benchmarks/sd_vs_diffusers.py --phases unet --sizes 256 --dtype fp32 --repeats 1
    # smoke test: small SD-structured models (sizes 128 and 64, 2 steps); about two minutes on one busy core in
    # fp32, nearly all of it the start-up of the 12 subprocesses (importing diffusers' pipeline alone takes ~10 s)
    python benchmarks/sd_vs_diffusers.py --tiny --dtype fp32 --repeats 1 --threads 1
    # both dtypes (a CPU without native bf16 kernels makes the bf16 convolutions very slow)
    python benchmarks/sd_vs_diffusers.py --tiny --repeats 1
    # the GPU table (a GPU machine): fp16 and bf16, eager and compiled, images/s at batch 8
    python benchmarks/sd_vs_diffusers.py --device cuda --dtype fp16 bf16 --sizes 512 --phases unet vae txt2img \
        --txt2img-batch 8 --rounds 2 --json sd_vs_diffusers_gpu.json
    python benchmarks/sd_vs_diffusers.py --device cuda --dtype fp16 --sizes 512 --phases unet txt2img --compile \
        --txt2img-batch 8
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import gzip
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PHASES = ("unet", "vae", "text", "txt2img")
# our kernel settings (LATENTDIFF_ONEDNN, latentdiff/nn/onednn.py): PyTorch's plain kernels, oneDNN on the weights as
# they are, oneDNN with convolution weights packed (plain copies kept; held once: the default), whether attention
# runs through our CPU kernel (LATENTDIFF_ATTENTION, latentdiff/nn/cpu_attention.py; the default) or SDPA, and whether
# fp32 3x3 convolutions take Winograd's F(4x4, 3x3) where it pays (LATENTDIFF_WINOGRAD, latentdiff/nn/winograd.py;
# the default). In waterfall order; winograd is the shipped setting, onednn the same without Winograd, sdpa also
# with PyTorch's SDPA for attention.
KERNELS = {"plain": "0", "nopack": "nopack", "keep": "keep", "sdpa": "1", "onednn": "1", "winograd": "1",
           "deepcache3": "1"}
ATTENTION = {"plain": "sdpa", "nopack": "sdpa", "keep": "sdpa", "sdpa": "sdpa", "onednn": "kernel",
             "winograd": "kernel", "deepcache3": "kernel"}
WINOGRAD = {"winograd": "1", "deepcache3": "1"}  # every other setting: "0"
# deepcache3 (txt2img only): the default kernels with DeepCache, the whole UNet every third step (an approximation)
LAYOUTS = ("contiguous", "channels_last")  # diffusers' memory formats
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEEDS = {"unet": 1, "vae": 2, "text": 3, "inputs": 4}
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
PROBE_VALUES = 512
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ models


def configs(tiny: bool) -> tuple[Any, Any, Any]:
    """(UNetConfig, AutoencoderConfig, CLIPTextConfig): SD v1.5's, or small ones with SD's structure (four UNet
    levels with attention at the first three, an f8 VAE, a causal CLIP text tower over the real vocabulary)."""
    from latentdiff.autoencoder.model import AutoencoderConfig
    from latentdiff.conditioning.clip import CLIPTextConfig
    from latentdiff.config import from_dict, read_yaml
    from latentdiff.diffusion.unet import UNetConfig

    if tiny:
        unet = UNetConfig.sd_v1(model_channels=32, context_dim=64, num_heads=8)
        vae = AutoencoderConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4,
                                resolution=256, norm_groups=8)
        clip = CLIPTextConfig.sd_v1(width=64, layers=2, heads=2, mlp_width=128)
        return unet, vae, clip
    vae = from_dict(AutoencoderConfig, read_yaml(ROOT / "configs" / "sd-kl-f8.yaml")["model"])
    return UNetConfig.sd_v1(), vae, CLIPTextConfig.sd_v1()


def _seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give the zero-initialised layers (the UNet's output conv and transformer outputs) small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return module.eval().requires_grad_(False)


def build_ours(part: str, tiny: bool) -> torch.nn.Module:
    """One of our components ("unet", "vae", "text") in float32, the same weights in every process."""
    from latentdiff.autoencoder.model import Autoencoder
    from latentdiff.conditioning.clip import CLIPTextModel
    from latentdiff.diffusion.unet import UNetModel

    unet, vae, clip = configs(tiny)
    torch.manual_seed(SEEDS[part])
    module = {"unet": lambda: UNetModel(unet), "vae": lambda: Autoencoder(vae),
              "text": lambda: CLIPTextModel(clip)}[part]()
    return _seeded(module, SEEDS[part])


def _assign(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    module.load_state_dict(weights, strict=True, assign=True)
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        raise RuntimeError(f"{type(module).__name__} kept tensors on the meta device")
    return module.eval().requires_grad_(False)


def build_theirs(part: str, tiny: bool) -> torch.nn.Module:
    """The same component as diffusers' / transformers' module, sharing our tensors (no copy)."""
    from latentdiff.formats.diffusers_names import (
        unet_config_to_diffusers,
        unet_to_diffusers,
        vae_config_to_diffusers,
        vae_to_diffusers,
    )

    unet_config, vae_config, clip_config = configs(tiny)
    ours = build_ours(part, tiny)
    weights = ours.state_dict()
    if part == "text":
        import transformers

        config = transformers.CLIPTextConfig(**clip_config.to_hf(), attn_implementation="sdpa")
        model = transformers.CLIPTextModel(config)
        own = set(model.state_dict())
        renamed = {k if k in own else k.removeprefix("text_model."): v for k, v in weights.items()}
        model.load_state_dict(renamed, strict=True)
        if model.config._attn_implementation != "sdpa":
            raise RuntimeError(f"transformers CLIP uses {model.config._attn_implementation!r} attention, not sdpa")
        return model.eval().requires_grad_(False)
    import diffusers
    from diffusers.models.attention_processor import AttnProcessor2_0

    if part == "unet":
        kwargs = {k: v for k, v in unet_config_to_diffusers(unet_config).items() if not k.startswith("_")}
        with torch.device("meta"):
            model = diffusers.UNet2DConditionModel(**kwargs)
        model = _assign(model, unet_to_diffusers(weights, unet_config))
    else:
        kwargs = {k: v for k, v in vae_config_to_diffusers(vae_config).items() if not k.startswith("_")}
        with torch.device("meta"):
            model = diffusers.AutoencoderKL(**kwargs)
        model = _assign(model, vae_to_diffusers(weights, vae_config))
    model.set_attn_processor(AttnProcessor2_0())
    return model


def write_tokenizer(folder: Path) -> Path:
    """A Hugging Face CLIP tokenizer folder (vocab.json, merges.txt) made from open_clip's BPE merge file, which
    both pipelines read (SD v1's: padding with the end token)."""
    from latentdiff.conditioning.tokenizer import NUM_MERGES, byte_to_unicode, default_vocab_path

    lines = gzip.open(default_vocab_path()).read().decode("utf-8").split("\n")
    merges = lines[1:NUM_MERGES + 1]
    symbols = list(byte_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(special, model_max_length=77)))
    return folder


# ------------------------------------------------------------------------------------------ memory


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    return _status_mb("VmRSS") or float("nan")


def peak_mb() -> float:
    """The resident-set high-water mark: VmHWM, else getrusage's ru_maxrss (kB on Linux)."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Free what can be freed, then reset the high-water mark to the current RSS (Linux >= 4.0)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ one phase


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, salt: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(SEEDS["inputs"] + salt)).to(dtype)


def _txt2img(impl: str, size: int, dtype: torch.dtype, tiny: bool, tokenizer_dir: Path, variant: str,
             spec: dict[str, Any]) -> tuple[Any, Any]:
    """(run(steps) -> images, modules) for a whole text-to-image call of ``spec["batch"]`` images, on
    ``spec["device"]``, the UNet compiled where ``spec["compile"]``."""
    device, batch = torch.device(spec["device"]), spec["batch"]
    if impl == "ours":
        from latentdiff.conditioning.tokenizer import CLIPTokenizer
        from latentdiff.pipelines import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(build_ours("unet", tiny), build_ours("vae", tiny), build_ours("text", tiny),
                                       CLIPTokenizer(tokenizer_dir), dtype=dtype, image_size=size, device=device)
        if spec["compile"]:
            pipe.unet = torch.compile(pipe.unet)

        options = {"deep_cache": 3} if variant == "deepcache3" else None

        def run(steps: int) -> torch.Tensor:
            return pipe.text_to_image(PROMPT, steps=steps, sampler="ddim", guidance_scale=GUIDANCE, generator=0,
                                      height=size, width=size, progress=False, sampler_options=options,
                                      num_images=batch).images
        return run, pipe
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                        set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")
    pipe = diffusers.StableDiffusionPipeline(
        vae=build_theirs("vae", tiny), text_encoder=build_theirs("text", tiny),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir)), unet=build_theirs("unet", tiny),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(device=device, dtype=dtype)
    if spec["compile"]:
        pipe.unet = torch.compile(pipe.unet)
    if variant == "channels_last":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)

    def run(steps: int) -> torch.Tensor:
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
                    generator=torch.Generator().manual_seed(0), output_type="pt", num_images_per_prompt=batch).images
    return run, pipe


def phase_function(spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(run, warm_up, modules) of one phase; ``run()`` returns the output tensor."""
    impl, phase, size, tiny = spec["impl"], spec["phase"], spec["size"], spec["tiny"]
    dtype = DTYPES[spec["dtype"]]
    channels_last = spec["variant"] == "channels_last"
    layout = torch.channels_last if channels_last else torch.contiguous_format
    unet_config, _, clip_config = configs(tiny)
    if phase == "txt2img":
        run_steps, modules = _txt2img(impl, size, dtype, tiny, Path(spec["tokenizer"]), spec["variant"], spec)
        return (lambda: run_steps(spec["steps"])), (lambda: run_steps(1)), modules
    build = build_ours if impl == "ours" else build_theirs
    device = torch.device(spec["device"])
    module = build(phase, tiny).to(device, dtype)
    if phase in ("unet", "vae"):
        module = module.to(memory_format=layout)
    if spec["compile"] and phase == "unet":
        module = torch.compile(module)
    if phase == "unet":
        latent = size // 8
        x = _inputs((2, 4, latent, latent), dtype, 0).to(device).contiguous(memory_format=layout)
        t = torch.tensor([500.0, 500.0], device=device)
        context = _inputs((2, 77, unet_config.context_dim), dtype, 1).to(device)
        if impl == "ours":
            def run() -> torch.Tensor:
                return module(x, t, context=context)
        else:
            def run() -> torch.Tensor:
                return module(x, t, encoder_hidden_states=context).sample
    elif phase == "vae":
        z = _inputs((1, 4, size // 8, size // 8), dtype, 2).to(device).contiguous(memory_format=layout)
        if impl == "ours":
            def run() -> torch.Tensor:
                return module.decode(z)
        else:
            def run() -> torch.Tensor:
                return module.decode(z).sample
    else:
        ids = torch.randint(0, clip_config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(5)).to(device)
        if impl == "ours":
            def run() -> torch.Tensor:
                return module.encode(ids)
        else:
            def run() -> torch.Tensor:
                return module(input_ids=ids).last_hidden_state
    return run, run, module


def _timed(fn: Any, cuda: bool) -> tuple[Any, float]:
    """(fn(), its wall seconds), waiting for the GPU's queued work on both ends where ``cuda``."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one phase of one implementation in this (fresh) process; returns times, memory and a probe."""
    torch.set_num_threads(spec["threads"])
    # Built outside inference mode, as the pipelines build them: weights made inside it have no version counter,
    # and our convolutions then keep them unpacked (latentdiff/nn/onednn.py).
    run, warm_up, modules = phase_function(spec)
    cuda = spec["device"].startswith("cuda")
    with torch.inference_mode():
        reset = reset_peak()
        before = rss_mb()
        if cuda:  # GPU memory: the allocator's peak over the phase instead of the process's resident set
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        first = _timed(warm_up, cuda)[1]
        times = []
        for _ in range(spec["repeats"]):
            out, seconds = _timed(run, cuda)
            times.append(seconds)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_mb()
    values = out.float().flatten()
    index = torch.linspace(0, values.numel() - 1, min(PROBE_VALUES, values.numel())).long()
    del modules
    return {**spec, "times_s": times, "median_s": statistics.median(times), "best_s": min(times), "first_s": first,
            "peak_mb": peak,
            "rss_before_mb": before,
            "peak_reset": reset, "probe": values[index].tolist(), "output_shape": list(out.shape)}


# ------------------------------------------------------------------------------------------ the comparison


def run_worker(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if spec["impl"] == "ours":
        env["LATENTDIFF_ONEDNN"] = KERNELS[spec["variant"]]
        env["LATENTDIFF_ATTENTION"] = ATTENTION[spec["variant"]]
        env["LATENTDIFF_WINOGRAD"] = WINOGRAD.get(spec["variant"], "0")
    proc = subprocess.run([sys.executable, "-u", __file__, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {**spec, "error": f"exit {proc.returncode}: {tail}"}


def label(phase: str, size: int, steps: int, batch: int = 1) -> str:
    images = f", {batch} images" if batch > 1 else ""
    return {"unet": f"UNet step {size}px (batch 2, CFG)", "vae": f"VAE decode {size}px",
            "text": "text encode (2 x 77 tokens)",
            "txt2img": f"txt2img {size}px, {steps} DDIM steps, CFG{images}"}[phase]


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    rows = []
    for phase in args.phases:
        if phase in ("unet", "vae"):
            rows += [(phase, size) for size in args.sizes]
        elif phase == "text":
            rows.append((phase, 0))
        else:
            rows.append((phase, args.txt2img_size or args.sizes[0]))
    return rows


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> float:
    """The largest difference of the probed outputs, relative to the largest probed value."""
    a, b = torch.tensor(ours["probe"]), torch.tensor(theirs["probe"])
    if a.shape != b.shape:
        return float("nan")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def table(results: list[dict[str, Any]], steps: int) -> str:
    """One row per side and setting; ratios divide best times by diffusers' best layout of the same phase."""
    lines = ["| phase | dtype | side: setting | best (s) | median (s) | first call (s) | / best diffusers | peak MB "
             "| phase +MB | max rel. diff | images/s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["dtype"], r["phase"], r["size"]), []).append(r)
    for (dtype, phase, size), rows in groups.items():
        theirs = [r for r in rows if r["impl"] == "diffusers" and "error" not in r]
        best = min(theirs, key=lambda r: r["best_s"]) if theirs else None
        for r in rows:
            batch = r.get("batch", 1)
            cells = [label(phase, size, steps, batch), dtype, f"{r['impl']}: {r['variant']}"]
            if "error" in r:
                lines.append("| " + " | ".join(cells + [r["error"], "", "", "", "", "", "", ""]) + " |")
                continue
            ratio = f"{r['best_s'] / best['best_s']:.2f}" if best else ""
            diff = f"{compare(r, best):.1e}" if best and r is not best else ""
            cells += [f"{r['best_s']:.3f}", f"{r['median_s']:.3f}", f"{r['first_s']:.3f}", ratio, f"{r['peak_mb']:.0f}",
                      f"{r['peak_mb'] - r['rss_before_mb']:.0f}", diff,
                      f"{batch / r['best_s']:.3f}" if phase == "txt2img" else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "missing"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    out["cpu"] = cpu
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads for both sides (default: torch's, %(default)s here)")
    parser.add_argument("--dtype", nargs="+", choices=[*DTYPES, "both"], default=["both"],
                        help="one or more of fp32 bf16 fp16, or both (fp32 and bf16, the default)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: the GPU table (peak MB is then the "
                                                        "CUDA allocator's peak)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet on both sides (its first call, the warm-up, compiles)")
    parser.add_argument("--txt2img-batch", type=int, default=1,
                        help="images per txt2img call (both sides; the table then gives images/s)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="image sides for the UNet and VAE phases (default 512 256; --tiny: 128 64)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per phase after one warm-up")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per side and phase, the sides alternating (default 1); on a shared "
                             "machine several rounds keep a slow spell from landing on one side only")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps of txt2img (default 20; --tiny: 2)")
    parser.add_argument("--txt2img-size", type=int, default=None, help="txt2img image side (default: first size)")
    parser.add_argument("--txt2img-repeats", type=int, default=1, help="timed txt2img runs after a 1-step warm-up")
    parser.add_argument("--tiny", action="store_true", help="small SD-structured models: a smoke run in seconds")
    parser.add_argument("--ours", nargs="+", choices=list(KERNELS), default=["winograd"],
                        help="our kernel settings to measure (default: the shipped one, winograd); 'plain nopack "
                             "keep sdpa onednn winograd' gives the waterfall")
    parser.add_argument("--theirs", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
                        help="diffusers' memory formats to measure; ratios use the fastest (default: both)")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    args.sizes = args.sizes or ([128, 64] if args.tiny else [512, 256])
    args.steps = args.steps or (2 if args.tiny else 20)
    if any(s % 64 for s in args.sizes + [args.txt2img_size or 64]):
        parser.error("sizes must be multiples of 64 (the VAE's 8 times the UNet's 8)")
    dtypes = list(dict.fromkeys(d for name in args.dtype for d in (["fp32", "bf16"] if name == "both" else [name])))
    info = versions()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(Path(tmp) / "tokenizer") if "txt2img" in args.phases else None
        for dtype in dtypes:
            for phase, size in plan(args):
                sides = [("ours", v) for v in args.ours if v != "deepcache3" or phase == "txt2img"]
                sides += [("diffusers", v) for v in args.theirs]
                merged: dict[tuple[str, str], dict[str, Any]] = {}
                for round_ in range(args.rounds):  # the sides alternate, so that a slow spell hits them alike
                    for impl, variant in sides:
                        spec = {"impl": impl, "variant": variant, "phase": phase, "size": size, "dtype": dtype,
                                "tiny": args.tiny, "threads": args.threads, "steps": args.steps,
                                "tokenizer": str(tokenizer), "device": args.device, "compile": args.compile,
                                "batch": args.txt2img_batch if phase == "txt2img" else 1,
                                "repeats": args.txt2img_repeats if phase == "txt2img" else args.repeats}
                        result = merge(merged.get((impl, variant)), run_worker(spec, args.threads))
                        merged[(impl, variant)] = result
                        status = result.get("error") or (f"best {result['best_s']:.4f} s, median "
                                                         f"{result['median_s']:.4f} s, peak {result['peak_mb']:.0f} MB")
                        print(f"  round {round_ + 1}: {impl:>9} {variant:>13} {dtype} "
                              f"{label(phase, size, args.steps, spec['batch'])}: {status}", file=sys.stderr,
                              flush=True)
                        if args.json:  # after every measurement, so that a run cut short keeps what it measured
                            write_json(args, info, results + list(merged.values()))
                results += merged.values()
    resets = {r.get("peak_reset") for r in results if "error" not in r}
    peak_note = ("peaks exclude model building (high-water mark reset)" if resets == {True}
                 else "peaks INCLUDE model building (the high-water mark could not be reset)")
    if args.device != "cpu":
        peak_note = f"device {args.device} ({info.get('gpu', '?')}), peak MB = the CUDA allocator's peak"
    compiled = ", the UNet compiled (torch.compile) on both sides" if args.compile else ""
    print(f"\nSD v1.5{' (tiny configs)' if args.tiny else ''}{compiled}: threads {args.threads}, cpu {info['cpu']}, "
          f"torch "
          f"{info['torch']}, diffusers {info['diffusers']}, transformers {info['transformers']}; {peak_note}; "
          f"{args.rounds} round(s) of {args.repeats} runs (txt2img: {args.txt2img_repeats}) after a warm-up, "
          "the sides alternating; ratios from the best times\n")
    print(table(results, args.steps))
    if args.json:
        write_json(args, info, results)


def merge(before: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, Any]:
    """One side's measurements over the rounds: every time, the best and the median, the highest peak."""
    if before is None or "error" in before or "error" in now:
        return now if before is None or "error" in now else before
    times = before["times_s"] + now["times_s"]
    return {**now, "times_s": times, "best_s": min(times), "median_s": statistics.median(times),
            "first_s": min(before["first_s"], now["first_s"]), "peak_mb": max(before["peak_mb"], now["peak_mb"]),
            "rss_before_mb": now["rss_before_mb"]}


def write_json(args: argparse.Namespace, info: dict[str, Any], results: list[dict[str, Any]]) -> None:
    rows = [{k: v for k, v in r.items() if k != "probe"} for r in results]
    args.json.write_text(json.dumps({"versions": info, "args": {k: str(v) if isinstance(v, Path) else v
                                                                for k, v in vars(args).items()},
                                     "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
