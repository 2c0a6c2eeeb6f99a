"""PNG parameters: A1111's ``parameters`` text (known answers, both ways), our ``latentdiff`` JSON chunk, atomic
writes, ``--no-metadata``, and ``generate --from-png`` reproducing grids, single images and ``--separate`` files
byte for byte on the bundled text-to-image model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from test_golden import _write_inputs

from latentdiff.cli import main
from latentdiff.diffusion.samplers import SAMPLER_ALIASES, SAMPLERS, resolve_sampler
from latentdiff.io.files import file_sha256
from latentdiff.pipelines.metadata import (
    JSON_KEY,
    PARAMETERS_KEY,
    PNGParametersError,
    a1111_parameters,
    a1111_sampler_name,
    model_identity,
    parse_a1111_parameters,
    read_png_parameters,
    save_png,
)

PROMPT = "a red sneaker on the left"
RECORD = {"prompt": "a cat, (sitting:1.2)\nsecond line", "negative": "blurry", "steps": 20,
          "sampler": "euler_ancestral", "guidance": 7.0, "seed": 1, "width": 512, "height": 768, "model_name": "sd15",
          "model_hash": "abcdef1234"}
A1111_TEXT = ("a cat, (sitting:1.2)\nsecond line\nNegative prompt: blurry\n"
              "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x768, Model hash: abcdef1234, Model: sd15")


def _chunks(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


def _run(*argv: str) -> int:
    return main(["generate", *argv])


def test_a1111_text_known_answer_both_ways() -> None:
    assert a1111_parameters(RECORD) == A1111_TEXT
    parsed = parse_a1111_parameters(A1111_TEXT)
    assert {k: parsed[k] for k in RECORD} == {**RECORD, "sampler": "Euler a"}
    assert a1111_sampler_name("dpmpp_2m", "karras") == "DPM++ 2M Karras"
    assert a1111_sampler_name("DPM++ 2M Karras", None) == "DPM++ 2M Karras"
    assert a1111_sampler_name("ddpm", None) == "ddpm"  # A1111 has no name for it: ours


def test_every_a1111_sampler_name_round_trips() -> None:
    """Each A1111 name we accept is the one we write for its (sampler, ramp), and reads back as the same pair."""
    for alias, (name, ramp) in SAMPLER_ALIASES.items():
        assert a1111_sampler_name(name, ramp) == alias
        parsed = parse_a1111_parameters(a1111_parameters(dict(RECORD, sampler=name, sigma_ramp=ramp)))
        assert parsed["sampler"] == alias and resolve_sampler(parsed["sampler"]) == (SAMPLERS[name], ramp)
    assert a1111_sampler_name("dpmpp_3m_sde", "exponential") == "DPM++ 3M SDE Exponential"
    assert a1111_sampler_name("unipc", None) == "UniPC"


@pytest.mark.parametrize("sampler, a1111_name", [("unipc", "UniPC"), ("DPM++ 2M SDE", "DPM++ 2M SDE"),
                                                 ("dpmpp_3m_sde", "DPM++ 3M SDE")])
def test_new_solvers_generate_and_come_back_from_png(tmp_path: Path, capsys, sampler: str, a1111_name: str) -> None:
    """The multistep solvers on the bundled model: 2 steps give an image, its PNG names the sampler as A1111 does,
    and --from-png gives the same bytes (the SDE solvers' per-step noise comes from the seed too)."""
    out = tmp_path / "out.png"
    assert _run(PROMPT, "--steps", "2", "--seed", "3", "--sampler", sampler, "-o", str(out)) == 0
    pixels = np.asarray(Image.open(out))
    assert pixels.shape == (32, 32, 3) and pixels.std() > 0
    assert f"Steps: 2, Sampler: {a1111_name}, " in _chunks(out)[PARAMETERS_KEY]
    assert read_png_parameters(out)["sampler"] == sampler
    again = tmp_path / "again.png"
    assert _run("--from-png", str(out), "-o", str(again)) == 0
    assert again.read_bytes() == out.read_bytes()


def test_a1111_text_quotes_and_extra_keys() -> None:
    text = ('a dog\nSteps: 4, Sampler: DDIM, CFG scale: 4.5, Seed: 9, Size: 64x64, Model: "my, model", '
            'Denoising strength: 0.6, Lora hashes: "a: 123, b: 456"')
    parsed = parse_a1111_parameters(text)
    assert parsed["model_name"] == "my, model" and parsed["strength"] == 0.6 and parsed["negative"] is None
    assert parsed["a1111"] == {"Lora hashes": "a: 123, b: 456"}
    assert a1111_parameters(dict(parsed, sampler="ddim")).startswith("a dog\nSteps: 4, Sampler: DDIM, CFG scale: 4.5")
    with pytest.raises(PNGParametersError, match="Steps"):
        parse_a1111_parameters("just a caption")
    with pytest.raises(PNGParametersError, match="malformed"):
        parse_a1111_parameters("x\nSteps: many, Seed: 1")


def test_save_png_is_atomic_and_carries_both_chunks(tmp_path: Path, monkeypatch) -> None:
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    out = save_png(image, tmp_path / "sub" / "a.png", dict(RECORD, index=None))
    chunks = _chunks(out)
    assert chunks[PARAMETERS_KEY] == A1111_TEXT and json.loads(chunks[JSON_KEY])["seed"] == 1
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(image))
    assert read_png_parameters(out) == dict(RECORD, index=None)
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.png"]  # no temporary file left behind

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(image, out, RECORD)
    assert read_png_parameters(out) == dict(RECORD, index=None)  # the old file is intact
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.png"]


def test_reading_parameters_of_bad_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.png"
    Image.new("RGB", (2, 2)).save(plain)
    with pytest.raises(PNGParametersError, match="no generation parameters"):
        read_png_parameters(plain)
    a1111 = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, A1111_TEXT)
    Image.new("RGB", (2, 2)).save(a1111, pnginfo=info)
    assert read_png_parameters(a1111)["sampler"] == "Euler a"
    (tmp_path / "text.png").write_text("not a png")
    with pytest.raises(PNGParametersError, match="not an image"):
        read_png_parameters(tmp_path / "text.png")
    with pytest.raises(OSError):
        read_png_parameters(tmp_path / "missing.png")


def test_model_identity_hashes_files_only(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    identity = model_identity(weights)
    assert identity["model_name"] == "model" and identity["model_file"] == "model.safetensors"
    assert identity["model_sha256"] == file_sha256(weights) and identity["model_hash"] == file_sha256(weights)[:10]
    assert model_identity(tmp_path) == {"model_name": tmp_path.name, "model_file": tmp_path.name}


def test_generate_records_parameters_and_from_png_reproduces_bytes(tmp_path: Path, capsys) -> None:
    grid = tmp_path / "grid.png"
    assert _run(PROMPT, "-n", "2", "--steps", "2", "--seed", "3", "--negative", "a bag", "--sampler", "Euler a",
                "-o", str(grid)) == 0
    record = read_png_parameters(grid)
    assert record["verb"] == "generate" and record["n"] == 2 and record["index"] is None
    assert record["model_name"] == "scenes-txt2img" and record["sampler"] == "Euler a"
    text = _chunks(grid)[PARAMETERS_KEY]
    assert text.startswith(f"{PROMPT}\nNegative prompt: a bag\nSteps: 2, Sampler: Euler a, CFG scale: ")
    again = tmp_path / "again.png"
    assert _run("--from-png", str(grid), "-o", str(again)) == 0
    assert again.read_bytes() == grid.read_bytes()
    # An explicit flag overrides the recorded one.
    other = tmp_path / "other.png"
    assert _run("--from-png", str(grid), "--seed", "4", "-o", str(other)) == 0
    assert read_png_parameters(other)["seed"] == 4 and other.read_bytes() != grid.read_bytes()


def test_separate_files_carry_their_own_index(tmp_path: Path, capsys) -> None:
    out = tmp_path / "img.png"
    assert _run(PROMPT, "-n", "2", "--steps", "2", "--seed", "5", "--separate", "-o", str(out)) == 0
    files = [tmp_path / "img-0.png", tmp_path / "img-1.png"]
    assert [read_png_parameters(f)["index"] for f in files] == [0, 1]
    again = tmp_path / "again.png"
    assert _run("--from-png", str(files[1]), "-o", str(again)) == 0
    assert again.read_bytes() == files[1].read_bytes()
    bare = tmp_path / "bare.png"
    assert _run(PROMPT, "--steps", "2", "--seed", "5", "--no-metadata", "-o", str(bare)) == 0
    assert _chunks(bare) == {}


def test_from_png_errors_are_one_line(tmp_path: Path, capsys) -> None:
    plain = tmp_path / "plain.png"
    Image.new("RGB", (2, 2)).save(plain)
    elsewhere = tmp_path / "elsewhere.png"
    save_png(Image.new("RGB", (2, 2)), elsewhere, dict(RECORD, verb="generate", model_file="gone.safetensors"))
    img2img = tmp_path / "img2img.png"
    save_png(Image.new("RGB", (2, 2)), img2img, dict(RECORD, verb="img2img"))
    cases = [(plain, "no generation parameters"), (tmp_path / "missing.png", "missing.png"),
             (elsewhere, "gone.safetensors.*give --model"), (img2img, "latentdiff img2img")]
    for png, message in cases:
        capsys.readouterr()
        assert _run("--from-png", str(png), "-o", str(tmp_path / "x.png")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("latentdiff: error: ")
        assert re.search(message, err[0]), err[0]


def test_from_png_falls_back_to_a1111_text(tmp_path: Path, capsys) -> None:
    """A PNG with only A1111's text (as A1111 writes it): the run is rebuilt from it, with --model for the model
    A1111 names by its stem; the pixels come back."""
    ours = tmp_path / "ours.png"
    assert _run(PROMPT, "--steps", "3", "--seed", "6", "--sampler", "Euler a", "--negative", "a bag",
                "-o", str(ours)) == 0
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, _chunks(ours)[PARAMETERS_KEY])
    a1111 = tmp_path / "a1111.png"
    Image.open(ours).save(a1111, pnginfo=info)
    again = tmp_path / "again.png"
    model = Path(__file__).resolve().parents[1] / "models" / "scenes-txt2img"
    assert _run("--from-png", str(a1111), "--model", str(model), "-o", str(again)) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(ours)))
    assert read_png_parameters(again)["negative"] == "a bag"


def test_a1111_variation_seed_known_answer() -> None:
    record = dict(RECORD, subseed=5, subseed_strength=0.25, strength=0.6)
    text = a1111_parameters(record)
    assert text.endswith("Model: sd15, Variation seed: 5, Variation seed strength: 0.25, Denoising strength: 0.6")
    parsed = parse_a1111_parameters(text)
    assert (parsed["subseed"], parsed["subseed_strength"], parsed["strength"]) == (5, 0.25, 0.6)
    assert "Variation seed" not in a1111_parameters(RECORD)  # only when there is a variation, as A1111


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("png_inputs")
    _write_inputs(folder)
    return folder


def test_img2img_and_inpaint_from_png_reproduce_bytes(inputs: Path, tmp_path: Path, capsys) -> None:
    """The recorded strength (A1111's Denoising strength), sampler, seed and variation come back; the input image
    and mask are given again, as A1111 needs them too."""
    init, mask = str(inputs / "init.png"), str(inputs / "mask.png")
    runs = {"img2img": [init], "inpaint": [init, mask]}
    for verb, files in runs.items():
        out, again = tmp_path / f"{verb}.png", tmp_path / f"{verb}-again.png"
        options = ["--strength", "0.7", "--steps", "3", "--seed", "2", "--sampler", "Euler a", "--subseed", "3",
                   "--subseed-strength", "0.2", "--negative", "a bag"]
        if verb == "inpaint":
            options.append("--keep-unmasked")
        assert main([verb, *files, PROMPT, *options, "-o", str(out)]) == 0
        assert "Denoising strength: 0.7" in _chunks(out)[PARAMETERS_KEY]
        assert main([verb, *files, "--from-png", str(out), "-o", str(again)]) == 0
        assert again.read_bytes() == out.read_bytes()
    # Another init image: the run goes on, with a warning that it is not the recorded one.
    capsys.readouterr()
    other = tmp_path / "other.png"
    assert main(["img2img", mask, "--from-png", str(tmp_path / "img2img.png"), "-o", str(other)]) == 0
    assert f"warning: {mask} is not the init {tmp_path / 'img2img.png'} was made from" in capsys.readouterr().err
    # A PNG of another verb names the verb that re-runs it.
    assert main(["img2img", init, "--from-png", str(tmp_path / "inpaint.png"), "-o", str(other)]) == 2
    assert "re-run it with `latentdiff inpaint --from-png`" in capsys.readouterr().err
