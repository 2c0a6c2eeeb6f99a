"""Where the main job's wall time goes: `latentdiff generate` with the bundled model, one image (issue 15).

Each repeat runs the command in a fresh interpreter with ``-X importtime`` and prints a table of the median over the
repeats: the whole wall time, the cumulative import time of torch, of latentdiff's modules (without torch) and of
everything else, and what is left (loading the model, sampling, writing the PNG). Each repeat also times a fresh
``python -c "import torch"`` (no ``-X importtime``): the floor under any command built on torch, on this machine.
Import times come from ``-X importtime`` (it adds a little overhead of its own; the wall time is measured around
the whole process).

    python benchmarks/startup.py                 # 5 repeats, the README's main job
    python benchmarks/startup.py --repeats 3 -- sample models/scenes-txt2img -n 4
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN_JOB = ["generate", "a red sneaker on the left and a blue bag on the right"]


def import_times(stderr: str) -> tuple[float, float, float]:
    """(torch, latentdiff without torch, everything else) in seconds, from ``-X importtime`` lines: the cumulative
    time of torch's first import wherever it happened, and of the imports the interpreter and ``-m`` made first (a
    name field with one leading space), split by package."""
    torch_s = ours = other = 0.0
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, field = line[len("import time:"):].split("|")
        name, seconds = field.strip(), int(cumulative) / 1e6
        if name == "torch":
            torch_s = seconds
        if field.startswith("  "):  # nested: counted in the import that made it
            continue
        if name.split(".")[0] == "latentdiff":
            ours += seconds
        elif name != "torch":
            other += seconds
    return torch_s, ours - torch_s, other


def run_once(verb_args: list[str], out: Path) -> dict[str, float]:
    command = [sys.executable, "-X", "importtime", "-m", "latentdiff.cli", *verb_args]
    if verb_args[0] in ("generate", "sample", "img2img", "inpaint", "seg2img", "upscale"):
        command += ["-o", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    torch_s, ours, other = import_times(done.stderr)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    floor = time.perf_counter() - start
    return {"wall": wall, "floor: python -c 'import torch' (wall)": floor, "torch": torch_s,
            "latentdiff (and its imports but torch)": ours, "other imports": other,
            "the rest (load, sample, write)": wall - torch_s - ours - other}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("verb_args", nargs="*", help="the command after `latentdiff` (default: the README's main job)")
    args = p.parse_args()
    verb_args = args.verb_args or MAIN_JOB
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_once(verb_args, Path(tmp) / "out.png") for _ in range(args.repeats)]
    print(f"\nlatentdiff {' '.join(verb_args)}: median of {args.repeats} runs\n")
    print("| part | seconds |")
    print("|---|---|")
    for key in runs[0]:
        print(f"| {key} | {statistics.median(r[key] for r in runs):.2f} |")


if __name__ == "__main__":
    main()
