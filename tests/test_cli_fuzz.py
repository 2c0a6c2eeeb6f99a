"""The command line against careless and hostile input: a generated list of bad invocations of every verb.

Each case runs in this process (``latentdiff.cli.main``) and must end with exit status 2, one line on stderr that
starts "latentdiff: error:" (no traceback), nothing written where the output was to go, and less than 1 GB more
peak memory. The cases: numbers out of range (0, negatives, NaN, infinity, fractions, seeds past 64 bits, -n
100000), output names that are folders or not PNGs, images that are missing, random bytes, truncated, directories,
decompression bombs or far too large for the model, weights that are corrupt, truncated, pickles that would run
code, NaN or integer where floats belong, configs stored as [] or {}, training states that are not ones, and
training configs with a billion laughs, lists where mappings belong and fields out of range. While a case runs,
the address space is capped a few GB above what the process already has, so that a check that regressed fails
the case instead of swapping the machine.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from latentdiff import cli
from latentdiff.data.datasets import load_image_file
from latentdiff.data.image_files import MAX_PIXELS_ENV, ImageTooLargeError
from latentdiff.pipelines.images import read_class_map, to_image_tensor

REPO = Path(__file__).resolve().parents[1]
MODELS = {name: REPO / "models" / f"scenes-{name}" for name in ("txt2img", "seg2img", "upscale", "inpaint")}
BASE_CONFIG = REPO / "configs" / "kl-f4-fmnist.yaml"
MEMORY_LIMIT = 1 << 30  # the most a refused call may add to the peak
ADDRESS_HEADROOM = 3 << 30  # the address-space cap above the process's own while a case runs


# ---- the cases ----------------------------------------------------------------------------------------------------

# Verbs that make images: a valid invocation (placeholders in braces) apart from the option under test.
IMAGE_VERBS = {
    "generate": ["generate", "a red dress", "--model", "{txt2img}"],
    "img2img": ["img2img", "{ok}", "a red dress", "--model", "{txt2img}"],
    "inpaint": ["inpaint", "{ok}", "{mask}", "a red dress", "--model", "{inpaint}"],
    "seg2img": ["seg2img", "{map}", "--model", "{seg2img}"],
    "upscale": ["upscale", "{lowres}", "--model", "{upscale}"],
}
STABLE_DIFFUSION_VERBS = ("generate", "img2img", "inpaint")  # the ones with --vae-tile and --clip-skip
BAD_OPTIONS = {  # option: values every image verb refuses
    "-n": ["0", "-1", "100000", "nan", "2.5", "x"],
    "--steps": ["0", "-3", "nan", "100000"],
    "--seed": ["-1", str(2**64), str(2**70), "nan", "1.5"],
    "--guidance": ["nan", "inf", "-inf", "-1", "x"],
    "--guidance-rescale": ["1.5", "-0.1", "nan"],
    "--attention-slice": ["-1"],
    "-o": ["{out}/", "{out}/x.txt", "{out}/x.jpg", "{out}/grid"],
}
BAD_IMAGES = ["{missing}", "{random}", "{truncated}", "{bomb}", "{huge}", "{folder_png}"]
BAD_MODELS = ["{nan_model}", "{inf_model}", "{int_model}", "{corrupt_st}", "{truncated_st}", "{folder_st}",
              "{evil_ckpt}", "{random_ckpt}", "{truncated_ckpt}", "{list_config}", "{empty_config}", "{missing}"]
BAD_OVERRIDES = ["train.steps=.inf", "train.steps=-5", "train.steps=0", "train.steps=1.5", "train.steps=true",
                 "train.steps=abc", "train.steps=.nan", "train.batch_size=0", "train.batch_size=-1", "train.lr=.nan",
                 "train.lr=-1", "train.lr=0", "train.lr=.inf", "model.ch=0", "model.ch=-1", "model.ch_mult=[]",
                 "model.ch_mult=[1,0]", "model.ch_mult=[1,-2]", "model=[1,2]", "train=5", "data.image_size=0",
                 "model.dropout=2", "train.betas=[1.5]", "train.ckpt_every=-1", "train.seed=-1", "data.limit=-1",
                 "train.keep_checkpoints=-1", "model.ch=[1]", "novalue", "train.steps=[&a [1,1], *a, *a]",
                 "model.norm_groups=0", "train.min_lr_ratio=2"]


def _image_verb_cases() -> list[list[str]]:
    cases = []
    for verb, base in IMAGE_VERBS.items():
        for option, values in BAD_OPTIONS.items():
            cases += [[*base, option, value] for value in values]
        if verb in STABLE_DIFFUSION_VERBS:
            cases += [[*base, option, value] for option in ("--vae-tile", "--clip-skip") for value in ("0", "-2")]
        if verb in ("img2img", "inpaint"):
            cases += [[*base, "--strength", value] for value in ("nan", "inf", "0", "1.5", "-1")]
    base = IMAGE_VERBS["generate"]
    cases += [[*base, "--height", value] for value in ("0", "-8", "nan", "4000")] + [[*base, "--width", "0"]]
    cases += [[*base, "--height", "4000", "--width", "4000"]]
    cases += [["img2img", image, "x", "--model", "{txt2img}"] for image in BAD_IMAGES]
    cases += [["inpaint", image, "{mask}", "x", "--model", "{inpaint}"] for image in BAD_IMAGES]
    cases += [["inpaint", "{ok}", mask, "x", "--model", "{inpaint}"] for mask in ("{missing}", "{bomb}", "{huge}")]
    cases += [["seg2img", image, "--model", "{seg2img}"] for image in (*BAD_IMAGES, "{ok}")]
    cases += [["upscale", image, "--model", "{upscale}"] for image in BAD_IMAGES]
    cases += [["generate", "--from-png", image] for image in ("{bomb}", "{random}", "{missing}", "{folder_png}")]
    return cases


def _model_cases() -> list[list[str]]:
    cases = [["generate", "x", "--model", model] for model in BAD_MODELS]
    cases += [["sample", model] for model in BAD_MODELS]
    cases += [["img2img", "{ok}", "x", "--model", model] for model in ("{nan_model}", "{evil_ckpt}")]
    cases += [["sample", state, "--no-ema"] for state in ("{random_state}", "{evil_state}", "{truncated_state}",
                                                          "{list_state}")]
    cases += [["export", model, "{out}/export"] for model in ("{nan_model}", "{int_model}", "{list_config}",
                                                               "{empty_config}", "{corrupt_st}", "{missing}",
                                                               "{evil_ckpt}")]
    cases += [["export", "{txt2img}", "{out}/export", "--guidance", value] for value in ("nan", "inf", "-1")]
    cases += [["convert", model, "{out}/converted", "--to", "diffusers"]
              for model in ("{evil_ckpt}", "{random_ckpt}", "{truncated_ckpt}", "{corrupt_st}", "{folder_st}",
                            "{missing}")]
    cases += [["convert", "{txt2img}", "{out}/converted", "--to", "bogus"]]
    return cases


def _other_verb_cases() -> list[list[str]]:
    cases = [["sample", "{txt2img}", option, value] for option, value in (
        ("-n", "0"), ("-n", "100000"), ("-n", "nan"), ("--steps", "0"), ("--seed", "-1"), ("--seed", str(2**64)),
        ("--guidance", "nan"), ("--guidance", "inf"), ("--class", "-1"), ("--nrow", "-1"), ("-o", "{out}/x.txt"),
        ("-o", "{out}/"))]
    cases += [["eval-autoencoder", "{ae}", option, value] for option, value in (
        ("--limit", "-1"), ("--limit", "nan"), ("--batch-size", "0"), ("--batch-size", "-1"), ("--seed", "-1"),
        ("--image-size", "0"), ("--image-size", "-32"), ("-o", "{out}/"))]
    cases += [["eval-autoencoder", model] for model in ("{corrupt_st}", "{list_config}", "{missing}", "{txt2img}")]
    cases += [["eval-nll", "{txt2img}", option, value] for option, value in (
        ("--limit", "-1"), ("--batch-size", "0"), ("--timesteps", "0"), ("--timesteps", "-1"),
        ("--timesteps", "abc"), ("--seed", str(2**64)))]
    cases += [["make-shards", "{images}", "{out}/shards", option, value] for option, value in (
        ("--max-count", "0"), ("--max-count", "-1"), ("--max-count", "nan"), ("--max-size", "0"),
        ("--max-size", "-1"), ("--max-size", "nan"), ("--max-size", "inf"))]
    cases += [["make-shards", folder, "{out}/shards"] for folder in ("{missing}", "{empty_folder}", "{ok}")]
    cases += [["info", model] for model in ("{corrupt_st}", "{truncated_st}", "{folder_st}", "{evil_ckpt}",
                                             "{random_ckpt}", "{truncated_ckpt}", "{list_config}", "{empty_config}",
                                             "{missing}", "{ok}")]
    base = IMAGE_VERBS["generate"]
    cases += [[*base, option, value] for option, value in (
        ("--subseed", "-1"), ("--subseed", str(2**64)), ("--subseed", "nan"), ("--subseed-strength", "nan"),
        ("--subseed-strength", "1.5"), ("--subseed-strength", "-0.1"), ("--prompts", "{missing}"),
        ("--prompts", "{binary}"), ("--prompts", "{random}"))]
    return cases


def _train_cases() -> list[list[str]]:
    out = ["train.out_dir={out}/run"]
    cases = [["train", config, *out] for config in (
        "{laughs}", "{list_top}", "{model_list}", "{not_yaml}", "{binary}", "{big_config}", "{python_tag}",
        "{unknown_key}", "{missing}", "{empty_list}")]
    cases += [["train", str(BASE_CONFIG), override, *out] for override in BAD_OVERRIDES]
    cases += [["train", "--resume", "{missing}"], ["train", "--resume", "{bad_run}"]]
    return cases


CASES = _image_verb_cases() + _model_cases() + _other_verb_cases() + _train_cases()


def test_the_cases_cover_every_verb() -> None:
    verbs = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert {case[0] for case in CASES} == verbs
    assert len(CASES) >= 200 and len({tuple(case) for case in CASES}) == len(CASES)


# ---- the bad files ------------------------------------------------------------------------------------------------

def _png_header(width: int, height: int, mode: int = 2) -> bytes:
    """A PNG that declares ``width`` x ``height`` (colour type ``mode``) with one row of data: what a decompression
    bomb looks like until it is decoded, and cheap to make."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
            + chunk(b"IEND", b""))


def _model_variant(root: Path, name: str, change) -> str:
    """A copy of the bundled text-to-image model with ``change(weights)`` applied to its weights."""
    folder = root / name
    shutil.copytree(MODELS["txt2img"], folder)
    weights = load_file(str(folder / "model.safetensors"))
    change(weights)
    save_file(weights, str(folder / "model.safetensors"), metadata={"latentdiff_config":
                                                                    (folder / "config.json").read_text()})
    return str(folder)


def _first_float_key(weights: dict) -> str:
    return sorted(k for k in weights if k.endswith(".weight"))[0]


def _set(weights: dict, value: float) -> None:
    weights[_first_float_key(weights)][0] = value


def _to_int(weights: dict) -> None:
    key = _first_float_key(weights)
    weights[key] = weights[key].to(torch.int64)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this file ran code",))


def _bad_weights(root: Path) -> dict[str, str]:
    files = {"nan_model": _model_variant(root, "nan", lambda w: _set(w, float("nan"))),
             "inf_model": _model_variant(root, "inf", lambda w: _set(w, float("inf"))),
             "int_model": _model_variant(root, "int", _to_int)}
    (root / "corrupt.safetensors").write_bytes(os.urandom(4096))
    good = (MODELS["txt2img"] / "model.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (root / "folder.safetensors").mkdir()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _RunsCode()}, root / "evil.ckpt")
    (root / "random.ckpt").write_bytes(os.urandom(4096))
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, root / "whole.ckpt")
    whole = (root / "whole.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])
    for name in ("corrupt", "truncated", "folder"):
        files[f"{name}_st"] = str(root / f"{name}.safetensors")
    files.update({name: str(root / f"{name.split('_')[0]}.ckpt") for name in ("evil_ckpt", "random_ckpt",
                                                                              "truncated_ckpt")})
    for name, config in (("list_config", "[]"), ("empty_config", "{}")):
        step = root / name / "checkpoints" / "step_0000001"
        step.mkdir(parents=True)
        save_file({"w": torch.zeros(1)}, str(step / "model.safetensors"))
        (step / "config.json").write_text(config)
        (root / name / "checkpoints" / "latest").write_text(step.name)
        files[name] = str(root / name)
    return files


def _bad_train_states(root: Path) -> dict[str, str]:
    files = {}
    torch.save({"model": {"w": torch.zeros(100)}}, root / "whole.pt")
    whole = (root / "whole.pt").read_bytes()
    for name, write in (("random", lambda p: p.write_bytes(os.urandom(2048))),
                        ("evil", lambda p: torch.save({"model": _RunsCode()}, p)),
                        ("truncated", lambda p: p.write_bytes(whole[: len(whole) // 2])),
                        ("list", lambda p: torch.save([1, 2], p))):
        folder = root / f"state_{name}"
        shutil.copytree(MODELS["txt2img"], folder)
        write(folder / "train_state.pt")
        files[f"{name}_state"] = str(folder)
    return files


LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True))


def _bad_configs(root: Path) -> dict[str, str]:
    texts = {"laughs": LAUGHS, "list_top": "- 1\n- 2\n", "model_list": "task: autoencoder\nmodel: [1, 2]\n",
             "not_yaml": "task: [autoencoder\n  model: {{\n", "python_tag": "task: !!python/object/apply:os.system "
             "['echo this config ran code']\n", "unknown_key": "task: autoencoder\nmodle: {}\n",
             "big_config": "task: autoencoder\n" + "# padding\n" * 200_000, "empty_list": "[]\n"}
    files = {}
    for name, text in texts.items():
        (root / f"{name}.yaml").write_text(text)
        files[name] = str(root / f"{name}.yaml")
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 8)
    files["binary"] = str(root / "binary.yaml")
    (root / "bad_run").mkdir()
    (root / "bad_run" / "config.yaml").write_text(LAUGHS)
    files["bad_run"] = str(root / "bad_run")
    return files


def _bad_images(root: Path) -> dict[str, str]:
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(root / "ok.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(root / "mask.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "map.png")
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(root / "lowres.png")
    (root / "random.png").write_bytes(os.urandom(2048))
    good = (root / "ok.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "bomb.png").write_bytes(_png_header(60000, 60000))  # 3.6 billion pixels declared
    (root / "huge.png").write_bytes(_png_header(4000, 4000))  # under the pixel limit; far too large for the model
    (root / "folder.png").mkdir()
    (root / "images").mkdir()
    shutil.copy(root / "ok.png", root / "images" / "ok.png")
    (root / "empty").mkdir()
    names = ("ok", "mask", "map", "lowres", "random", "truncated", "bomb", "huge")
    return {**{name: str(root / f"{name}.png") for name in names}, "folder_png": str(root / "folder.png"),
            "images": str(root / "images"), "empty_folder": str(root / "empty")}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, first_stage) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fuzz")
    return {**{name: str(path) for name, path in MODELS.items()}, "ae": str(first_stage),
            "missing": str(root / "nowhere" / "missing.png"), **_bad_weights(root), **_bad_train_states(root),
            **_bad_configs(root), **_bad_images(root)}


# ---- running one case ---------------------------------------------------------------------------------------------

def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def _reset_peak() -> int:
    """Reset the process's peak resident size (Linux: clear_refs 5) and return the resident size now, in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _run_bounded(argv: list[str]) -> tuple[int, int]:
    """``cli.main(argv)`` under an address-space cap; (its exit status, how far it raised the resident size above
    where it started, in bytes: every allocation counts, Python's, numpy's and torch's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space() + ADDRESS_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    start = _reset_peak()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return code, _status_kib("VmHWM") * 1024 - start


@pytest.mark.parametrize("case", CASES, ids=[f"{i:03d}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_invocation_is_one_line(case, bad_files, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # a default output (out.png, samples.png) would land here
    out = tmp_path / "out"
    argv = [arg.format(out=out, **bad_files) for arg in case]
    code, peak = _run_bounded(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}: {argv}\n{err}"
    assert len(lines) == 1 and lines[0].startswith("latentdiff: error: "), f"{argv}\n{err}"
    assert "Traceback" not in err and len(lines[0]) < 1000, lines[0][:2000]
    assert "ran code" not in err
    assert not out.exists(), f"{argv} left {sorted(p.name for p in out.rglob('*'))}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], f"{argv} wrote into the working folder"
    assert peak < MEMORY_LIMIT, f"{argv} added {peak / 2**20:.0f} MiB to the peak"


def test_a_failed_case_would_be_seen(tmp_path, capsys) -> None:
    """The harness itself: a good invocation exits 0 (so the cases above fail for their bad part alone)."""
    out = tmp_path / "ok.png"
    code, peak = _run_bounded(["generate", "a red dress", "--model", str(MODELS["txt2img"]), "--steps", "1", "-o",
                               str(out)])
    assert code == 0 and out.is_file() and peak < MEMORY_LIMIT, capsys.readouterr().err


def test_messages_name_the_cause(bad_files, capsys) -> None:
    """A few of the lines, word for word where the issue asks for it."""
    expect = {
        ("generate", "x", "--model", bad_files["evil_ckpt"]): "would run code when loaded (pickle global os.system); "
                                                               "refused",
        ("generate", "x", "--seed", str(2**70)): "--seed must be a whole number in [0, 2**64 - 1]",
        ("generate", "x", "-o", "out/"): "is a folder",
        ("generate", "x", "-n", "100000"): "at most 10000 images per call",
        ("img2img", bad_files["bomb"], "x"): "LATENTDIFF_MAX_PIXELS",
        ("train", bad_files["laughs"]): "expands (through its YAML aliases) to more than",
        ("sample", bad_files["truncated_state"], "--no-ema"): "train_state.pt",
        ("generate", "x", "--model", bad_files["nan_model"]): "holds NaN or infinite weights; refused",
    }
    for argv, words in expect.items():
        code, _ = _run_bounded(list(argv))
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err) < 600, (argv, err)


# ---- the limits themselves ----------------------------------------------------------------------------------------

def test_batches_continue_one_seed(tmp_path, capsys) -> None:
    """-n above --batch-size: made batch by batch on one generator, so the first batch is what -n B gives."""
    base = ["generate", "a red dress", "--model", str(MODELS["txt2img"]), "--steps", "2", "--seed", "5", "--separate"]
    assert cli.main([*base, "-n", "3", "--batch-size", "2", "-o", str(tmp_path / "a.png")]) == 0
    assert cli.main([*base, "-n", "2", "-o", str(tmp_path / "b.png")]) == 0
    pixels = {p.name: np.asarray(Image.open(p)) for p in sorted(tmp_path.glob("*.png"))}
    assert sorted(pixels) == ["a-0.png", "a-1.png", "a-2.png", "b-0.png", "b-1.png"]
    assert np.array_equal(pixels["a-0.png"], pixels["b-0.png"]) and np.array_equal(pixels["a-1.png"], pixels["b-1.png"])
    assert not np.array_equal(pixels["a-2.png"], pixels["a-0.png"])
    capsys.readouterr()


def test_sample_batches_continue_one_seed(tmp_path, capsys) -> None:
    """`sample` too: -n 6 in batches of 4 begins with the grid of -n 4 (each class label stays with its image)."""
    base = ["sample", str(MODELS["txt2img"]), "--steps", "2", "--seed", "3", "--nrow", "1", "--prompt", "a red bag",
            "--prompt", "a blue shoe"]
    assert cli.main([*base, "-n", "6", "--batch-size", "4", "-o", str(tmp_path / "six.png")]) == 0
    assert cli.main([*base, "-n", "4", "-o", str(tmp_path / "four.png")]) == 0
    six, four = (np.asarray(Image.open(tmp_path / name)) for name in ("six.png", "four.png"))
    row = (four.shape[0] - 2) // 4  # one image per row, each with its 2-pixel border
    assert six.shape[0] == 2 + 6 * row
    assert np.array_equal(six[:four.shape[0]], four)
    assert not np.array_equal(six[2 + 4 * row:2 + 5 * row], six[2:2 + row])  # the fifth image is a new draw
    capsys.readouterr()


def test_pixel_limit_comes_from_the_environment(tmp_path, monkeypatch) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200)).save(path)
    assert to_image_tensor(path).shape == (1, 3, 200, 300)
    monkeypatch.setenv(MAX_PIXELS_ENV, "50000")
    with pytest.raises(ImageTooLargeError, match=f"300x200 pixels, more than the 50000 .*{MAX_PIXELS_ENV}=N"):
        to_image_tensor(path)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(60000, 60000))
    monkeypatch.delenv(MAX_PIXELS_ENV)
    for read in (to_image_tensor, read_class_map, load_image_file):
        with pytest.raises(ImageTooLargeError, match=MAX_PIXELS_ENV):
            read(bomb)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match="not a whole number"):
        to_image_tensor(path)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path) -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    pixels = to_image_tensor(path)
    expected = torch.from_numpy(np.rint(ramp / 257.0) / 255.0).float()
    assert torch.allclose(pixels[0, 0], expected, atol=1e-6) and float(pixels.mean()) < 0.6
