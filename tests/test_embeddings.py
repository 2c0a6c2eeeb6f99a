"""Textual-inversion embeddings (``--embedding FILE``, ``load_pipeline(..., embeddings=...)``): the three file layouts
(A1111 .pt and .safetensors, diffusers' learned_embeds), the tokenizer's added words, a pickle that would run code
refused, and parity with diffusers' ``load_textual_inversion`` on the tiny SD model (a 2-vector A1111 file and a
1-vector diffusers file in one prompt), asserted at 1e-4 as tests/test_sd_pipeline.py does (the issue: 1/255)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import test_sd_pipeline as sd
import torch
from PIL import Image
from safetensors.torch import save_file

from latentdiff.conditioning.tokenizer import CLIPTokenizer
from latentdiff.formats import save_diffusers
from latentdiff.formats.embeddings import read_embedding
from latentdiff.io.errors import CheckpointError
from latentdiff.pipelines import load_pipeline

TOL = 1e-4
WIDTH = 32  # the tiny text encoder's
PROMPT = "a photo of <toy> on a beach, mystyle"


class RunsCode:
    """A pickled object whose loading would call ``print``: what a malicious .pt does with ``os.system``."""

    def __reduce__(self):
        return print, ("ran code",)


def _vectors(count: int, seed: int) -> torch.Tensor:
    return 0.5 * torch.randn(count, WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embeddings")
    a1111_pt = root / "mystyle.pt"
    torch.save({"string_to_param": {"*": _vectors(2, 1)}, "name": "ignored", "step": 100}, a1111_pt)
    a1111_st = root / "other.safetensors"
    save_file({"emb_params": _vectors(3, 2)}, str(a1111_st))
    learned = root / "learned_embeds.safetensors"
    save_file({"<toy>": _vectors(1, 3)[0]}, str(learned))
    tokenizer = sd.write_tokenizer(root / "tokenizer")
    base = save_diffusers(sd.tiny_components(sd.UNET, seed=0, tokenizer=tokenizer), root / "base")
    return {"a1111_pt": a1111_pt, "a1111_st": a1111_st, "learned": learned, "base": base}


def test_the_three_layouts_give_word_and_vectors(files) -> None:
    expected = {"a1111_pt": ("mystyle", _vectors(2, 1)), "a1111_st": ("other", _vectors(3, 2)),
                "learned": ("<toy>", _vectors(1, 3))}
    for name, (word, vectors) in expected.items():
        got_word, got = read_embedding(files[name])
        assert got_word == word and torch.equal(got, vectors)


def test_foreign_and_unsafe_files_are_refused(tmp_path) -> None:
    torch.save({"string_to_param": {"*": RunsCode()}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        read_embedding(tmp_path / "evil.pt")
    save_file({"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointError, match="not a textual-inversion embedding"):
        read_embedding(tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        read_embedding(tmp_path / "missing.pt")


def test_added_words_become_their_tokens() -> None:
    tokenizer = CLIPTokenizer()
    size = tokenizer.vocab_size
    assert tokenizer.add_word("mystyle", 3) == [size, size + 1, size + 2]
    assert tokenizer.vocab_size == size + 3
    plain = tokenizer.text_to_ids("a photo, in")
    ids = tokenizer.text_to_ids("a photo, in MyStyle")
    assert ids == plain + [size, size + 1, size + 2]
    assert tokenizer.decode(ids) == "a photo , in mystyle mystyle_1 mystyle_2"
    with pytest.raises(ValueError, match="already added"):
        tokenizer.add_word("mystyle")


def test_embeddings_match_diffusers_load_textual_inversion(files) -> None:
    ours = load_pipeline(files["base"], embeddings=[files["a1111_pt"], files["learned"]])
    theirs = sd.with_scheduler(sd.load_theirs(files["base"]), "ddim")
    theirs.load_textual_inversion(str(files["a1111_pt"]), token="mystyle")
    theirs.load_textual_inversion(str(files["learned"]))
    ids = theirs.tokenizer(theirs.maybe_convert_prompt(PROMPT, theirs.tokenizer)).input_ids
    assert ours.tokenizer.text_to_ids(PROMPT) == ids[1:-1]
    run = dict(guidance_scale=7.5, steps=4, sampler="ddim")
    got = ours.text_to_image(PROMPT, latents=sd.initial_latents(), generator=1, **run).images
    expected = theirs(PROMPT, guidance_scale=7.5, num_inference_steps=4, latents=sd.initial_latents(),
                      generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert sd.max_diff(got, expected) <= TOL
    plain = load_pipeline(files["base"]).text_to_image(PROMPT.replace("<toy>", "toy"),
                                                       latents=sd.initial_latents(), generator=1, **run).images
    assert sd.max_diff(got, plain) > 20 * TOL  # the learned vectors matter


def test_cli_embedding_flag(tmp_path, capsys, files) -> None:
    out = tmp_path / "out.png"
    code, stdout, _ = sd.run_cli(capsys, "generate", PROMPT, "--steps", 2, "--sampler", "ddim", "--model",
                                 files["base"], "--embedding", files["a1111_pt"], "--embedding", files["learned"],
                                 "-o", out)
    assert code == 0 and "wrote 1 image" in stdout
    pipe = load_pipeline(files["base"], embeddings=[files["a1111_pt"], files["learned"]])
    expected = pipe.text_to_image(PROMPT, steps=2, sampler="ddim", generator=0).pil()[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    torch.save({"string_to_param": {"*": RunsCode()}}, tmp_path / "evil.pt")
    code, _, err = sd.run_cli(capsys, "generate", PROMPT, "--steps", 1, "--model", files["base"], "--embedding",
                              tmp_path / "evil.pt", "-o", tmp_path / "x.png")
    sd.one_error_line(code, err, "refused")
    save_file({"emb_params": torch.zeros(1, 8)}, str(tmp_path / "wide.safetensors"))
    code, _, err = sd.run_cli(capsys, "generate", PROMPT, "--steps", 1, "--model", files["base"], "--embedding",
                              tmp_path / "wide.safetensors", "-o", tmp_path / "x.png")
    sd.one_error_line(code, err, "8-wide vectors")
    assert not (tmp_path / "x.png").exists()
