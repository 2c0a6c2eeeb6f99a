"""Variation seeds (A1111's ``Variation seed`` / ``Variation seed strength``): the slerp's known answers, the noise of
subseed + i per image, strength 0 leaving every image exactly as it was, and ``--subseed`` on the command line with
its PNG record and ``--from-png`` round trip, on the bundled native model and on a tiny Stable Diffusion file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_golden import tiny_sd_file

from latentdiff.cli import main
from latentdiff.pipelines import load_pipeline
from latentdiff.pipelines.metadata import read_png_parameters
from latentdiff.pipelines.variation import Variation, slerp, variation_of

MODELS = Path(__file__).resolve().parents[1] / "models"
PROMPT = "a red sneaker on the left"


def _column(*values: float) -> torch.Tensor:
    """A (1, H, 1) tensor: one column of H values, the vectors slerp works on."""
    return torch.tensor(values, dtype=torch.float64).reshape(1, -1, 1)


def test_slerp_known_answers() -> None:
    e1, e2 = _column(1.0, 0.0), _column(0.0, 2.0)
    assert torch.equal(slerp(0.0, e1, e2), e1)
    assert torch.allclose(slerp(1.0, e1, e2), e2, atol=1e-12)
    # Orthogonal: the angle splits evenly, each end's weight sin((1 - t) pi / 2) and sin(t pi / 2).
    half = math.sqrt(0.5)
    assert torch.allclose(slerp(0.5, e1, e2), _column(half, 2 * half), atol=1e-12)
    assert torch.allclose(slerp(1 / 3, e1, _column(0.0, 1.0)), _column(math.cos(math.pi / 6), 0.5), atol=1e-12)
    # Parallel (cosine above 0.9995): the straight line, not the ends swapped as in A1111's fallback.
    assert torch.allclose(slerp(0.25, e1, _column(3.0, 0.0)), _column(1.5, 0.0), atol=1e-12)
    assert torch.allclose(slerp(0.25, e1, _column(1.0, 0.01)), _column(1.0, 0.0025), atol=1e-12)


def test_slerp_moves_each_column_on_its_own_circle() -> None:
    g = torch.Generator().manual_seed(0)
    low, high = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    mixed = slerp(0.3, low, high)
    for c in range(3):
        for w in range(4):
            alone = slerp(0.3, low[c:c + 1, :, w:w + 1], high[c:c + 1, :, w:w + 1])
            assert torch.allclose(mixed[c:c + 1, :, w:w + 1], alone, atol=1e-6)
    # The norms interpolate between the ends' norms (unit-norm ends stay on the sphere).
    unit_low, unit_high = low / low.norm(dim=-2, keepdim=True), high / high.norm(dim=-2, keepdim=True)
    assert torch.allclose(slerp(0.7, unit_low, unit_high).norm(dim=-2), torch.ones(3, 4), atol=1e-5)


def test_variation_draws_subseed_plus_i_and_leaves_strength_zero_alone() -> None:
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    sub = Variation(7, 1.0).subnoise(noise.shape)
    for i in range(2):
        assert torch.equal(sub[i], torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(7 + i)))
    assert torch.allclose(Variation(7, 1.0).apply(noise), sub, atol=1e-5)
    assert torch.equal(Variation(7, 0.25).apply(noise)[1], slerp(0.25, noise[1], sub[1]))
    assert variation_of(7, 0.0) is None and variation_of(None, 0.0) is None
    with pytest.raises(ValueError, match="subseed N"):
        variation_of(None, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        variation_of(3, 1.5)


def test_native_pipeline_mixes_the_initial_noise() -> None:
    pipe = load_pipeline(MODELS / "scenes-txt2img")
    run = dict(num_images=2, steps=2, sampler="ddim", generator=3, decode=False, progress=False)
    plain = pipe.text_to_image(PROMPT, **run).latents
    assert torch.equal(pipe.text_to_image(PROMPT, variation=Variation(5, 0.0), **run).latents, plain)
    varied = pipe.text_to_image(PROMPT, variation=Variation(5, 0.2), **run).latents
    assert not torch.equal(varied, plain)
    # The same as giving the mixed noise as latents (the seed's noise is the batch's first draw).
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    given = pipe.text_to_image(PROMPT, latents=Variation(5, 0.2).apply(noise), **run).latents
    assert torch.allclose(varied, given, atol=1e-6)


def _generate(*argv: str) -> int:
    return main(["generate", *argv])


def test_cli_variation_recorded_as_a1111_and_reproduced(tmp_path: Path, capsys) -> None:
    base, zero, varied = tmp_path / "base.png", tmp_path / "zero.png", tmp_path / "varied.png"
    common = [PROMPT, "--steps", "2", "--seed", "4", "-n", "2", "--separate"]
    assert _generate(*common, "-o", str(base)) == 0
    assert _generate(*common, "--subseed", "9", "--subseed-strength", "0", "-o", str(zero)) == 0
    for i in range(2):  # strength 0: the very same files, record included
        assert (tmp_path / f"zero-{i}.png").read_bytes() == (tmp_path / f"base-{i}.png").read_bytes()
    assert _generate(*common, "--subseed", "9", "--subseed-strength", "0.1", "-o", str(varied)) == 0
    with Image.open(tmp_path / "varied-1.png") as image:
        text = image.text["parameters"]
        assert image.tobytes() != Image.open(tmp_path / "base-1.png").tobytes()
    assert "Variation seed: 9, Variation seed strength: 0.1" in text
    record = read_png_parameters(tmp_path / "varied-1.png")
    assert (record["subseed"], record["subseed_strength"], record["index"]) == (9, 0.1, 1)
    again = tmp_path / "again.png"
    assert _generate("--from-png", str(tmp_path / "varied-1.png"), "-o", str(again)) == 0
    assert again.read_bytes() == (tmp_path / "varied-1.png").read_bytes()
    capsys.readouterr()
    assert _generate(PROMPT, "--subseed-strength", "0.5", "-o", str(tmp_path / "x.png")) == 2
    assert capsys.readouterr().err.strip() == ("latentdiff: error: a variation strength (--subseed-strength) needs a "
                                               "variation seed (--subseed N)")


def test_cli_variation_on_stable_diffusion(tmp_path_factory, tmp_path: Path, capsys) -> None:
    sd = tiny_sd_file(tmp_path_factory.mktemp("variation_sd"))
    out, again = tmp_path / "sd.png", tmp_path / "again.png"
    common = ["--model", str(sd), "--steps", "2", "--sampler", "Euler a", "--seed", "1"]
    assert _generate("a cat", *common, "-o", str(tmp_path / "plain.png")) == 0
    assert _generate("a cat", *common, "--subseed", "2", "--subseed-strength", "0.5", "-o", str(out)) == 0
    assert Image.open(out).tobytes() != Image.open(tmp_path / "plain.png").tobytes()
    assert _generate("--from-png", str(out), "--model", str(sd), "-o", str(again)) == 0
    assert again.read_bytes() == out.read_bytes()


def test_cli_variation_keeps_subseed_plus_i_across_batches(tmp_path: Path) -> None:
    """-n 3 made one image at a time (--batch-size 1) is -n 3 at once: image i mixes in seed subseed + i's noise,
    whichever batch it falls in (batches only change the last bits of the computation)."""
    common = [PROMPT, "--steps", "2", "--seed", "4", "-n", "3", "--separate", "--subseed", "5",
              "--subseed-strength", "0.5"]
    assert _generate(*common, "-o", str(tmp_path / "once.png")) == 0
    assert _generate(*common, "--batch-size", "1", "-o", str(tmp_path / "single.png")) == 0
    for i in range(3):
        once, single = (np.asarray(Image.open(tmp_path / f"{name}-{i}.png"), dtype=np.int16)
                        for name in ("once", "single"))
        assert np.abs(once - single).max() <= 1, i
