"""A1111's prompt syntax: the parser's known answers, chunks of 75 tokens, emphasis, padding and clip skip.

The parser's expected values are those A1111's ``parse_prompt_attention`` documents for the same prompts. Encoding
runs on the tiny SD v1 model of ``test_sd_pipeline`` (CLIP 32 wide, 2 layers, the real CLIP tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_clip import ours_and_hf
from test_sd_pipeline import UNET, one_error_line, run_cli, tiny_components, write_tokenizer

from latentdiff.conditioning.clip import CLIPTextConfig
from latentdiff.conditioning.prompt_syntax import (
    BREAK,
    PromptSyntaxError,
    WeightedText,
    apply_emphasis,
    parse_prompt_attention,
    prompt_chunks,
)
from latentdiff.conditioning.tokenizer import CLIPTokenizer
from latentdiff.formats import save_diffusers
from latentdiff.pipelines import StableDiffusionPipeline

LONG_PROMPT = "a red cat " * 30  # 90 tokens: two chunks


@pytest.mark.parametrize("prompt, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("[[faint]] ((strong)) c:d", [("faint", 1 / 1.1 / 1.1), (" ", 1.0), ("strong", 1.21), (" c:d", 1.0)]),
    ("unmatched) and ] stay", [("unmatched) and ] stay", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parser_known_answers(prompt: str, expected: list[tuple[str, float]]) -> None:
    parsed = parse_prompt_attention(prompt)
    assert [p.text for p in parsed] == [text for text, _ in expected]
    assert [p.weight for p in parsed] == pytest.approx([weight for _, weight in expected], rel=1e-12)


def test_break_splits_only_as_an_upper_case_word() -> None:
    assert parse_prompt_attention("a cat BREAK (a dog)") == [WeightedText("a cat", 1.0), BREAK,
                                                              WeightedText("a dog", 1.1)]
    assert parse_prompt_attention("breaking BREAKS break") == [WeightedText("breaking BREAKS break", 1.0)]


def test_a_weight_that_is_not_a_number_is_one_clear_error() -> None:
    with pytest.raises(PromptSyntaxError, match="'1.2.3' is not a number"):
        parse_prompt_attention("a (cat:1.2.3)")


# ---- chunks -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


def test_a_short_plain_prompt_is_one_chunk_of_the_tokenizers_ids(tokenizer: CLIPTokenizer) -> None:
    prompt = "a photograph of an astronaut, riding a horse"
    (chunk,) = prompt_chunks(prompt, tokenizer)
    assert chunk.ids == tokenizer(prompt).input_ids[0].tolist()
    assert chunk.weights == [1.0] * 77


def test_long_prompts_run_on_in_chunks_of_75(tokenizer: CLIPTokenizer) -> None:
    ids = tokenizer.text_to_ids(LONG_PROMPT)
    chunks = prompt_chunks(LONG_PROMPT, tokenizer)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert len(ids) == 90 and len(chunks) == 2
    assert chunks[0].ids == [bos, *ids[:75], eos]
    assert chunks[1].ids == [bos, *ids[75:], eos] + [pad] * 60


def test_break_pads_the_chunk_and_the_weights_follow_their_tokens(tokenizer: CLIPTokenizer) -> None:
    first, second = prompt_chunks("a (cat:1.5) BREAK [dog]", tokenizer)
    assert first.ids == tokenizer("a cat").input_ids[0].tolist()
    assert second.ids == tokenizer("dog").input_ids[0].tolist()
    assert first.weights[:4] == [1.0, 1.0, 1.5, 1.0] and set(first.weights[3:]) == {1.0}
    assert second.weights[1] == pytest.approx(1 / 1.1)


def test_a_full_chunk_moves_the_words_after_a_late_comma_on(tokenizer: CLIPTokenizer) -> None:
    prompt = "cat " * 70 + ", " + "dog " * 10
    cat, dog, comma = (tokenizer.text_to_ids(word)[0] for word in ("cat", "dog", ","))
    wrapped = prompt_chunks(prompt, tokenizer)
    assert wrapped[0].ids[1:73] == [cat] * 70 + [comma, tokenizer.eos_token_id]
    assert wrapped[1].ids[1:12] == [dog] * 10 + [tokenizer.eos_token_id]
    cut = prompt_chunks(prompt, tokenizer, comma_backtrack=0)
    assert cut[0].ids[72:77] == [dog] * 4 + [tokenizer.eos_token_id]
    assert cut[1].ids[1:8] == [dog] * 6 + [tokenizer.eos_token_id]


def test_emphasis_scales_tokens_and_keeps_each_rows_mean() -> None:
    context = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    weights = torch.ones(2, 5)
    weights[0, 2] = 1.5
    out = apply_emphasis(context, weights)
    assert torch.equal(out[1], context[1])
    assert out[0].mean() == pytest.approx(float(context[0].mean()), abs=1e-6)
    ratio = out[0] / context[0]
    assert ratio[2] / ratio[0] == pytest.approx(torch.full((4,), 1.5), rel=1e-5)
    assert apply_emphasis(context, torch.ones(2, 5)) is context
    centred = torch.zeros(1, 2, 4)  # a weighted mean of exactly 0 is not divided by
    centred[0, 1, :2] = torch.tensor([1.0, -1.0])
    torch.testing.assert_close(apply_emphasis(centred, torch.tensor([[1.0, 2.0]])), centred * 2)


# ---- the pipeline -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> StableDiffusionPipeline:
    root = tmp_path_factory.mktemp("prompt_syntax")
    comps = tiny_components(UNET, seed=0, tokenizer=write_tokenizer(root / "tokenizer"))
    return StableDiffusionPipeline.from_components(comps)


def plain_encoding(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    return pipe.text_encoder.encode(pipe.tokenizer(prompts).input_ids).float()


def test_unweighted_chunked_prompts_equal_the_plain_encoder(pipe: StableDiffusionPipeline) -> None:
    prompts = ["a photograph of an astronaut riding a horse", "blurry, low quality", ""]
    assert torch.equal(pipe.encode_prompt(prompts), plain_encoding(pipe, prompts))


def test_long_prompt_chunks_are_encoded_apart_and_the_negative_is_padded(pipe: StableDiffusionPipeline) -> None:
    ids = pipe.tokenizer.text_to_ids(LONG_PROMPT)
    long = pipe.encode_prompt(LONG_PROMPT)
    first = pipe.tokenizer.decode(ids[:75])
    assert long.shape == (1, 154, 32)
    torch.testing.assert_close(long[:, :77], plain_encoding(pipe, [first]), rtol=0, atol=1e-6)
    cond, uncond, batch = pipe._conditioning(LONG_PROMPT, "blurry", 2)
    assert batch == 2 and cond["context"].shape == uncond["context"].shape == (2, 154, 32)
    empty = plain_encoding(pipe, [""])[0]
    assert torch.equal(uncond["context"][0, :77], plain_encoding(pipe, ["blurry"])[0])
    assert torch.equal(uncond["context"][0, 77:], empty)
    # and the other way round: a short prompt is padded to a long negative prompt
    cond, uncond, _ = pipe._conditioning("a cat", LONG_PROMPT, 1)
    assert torch.equal(cond["context"][0, 77:], empty) and uncond["context"].shape == (1, 154, 32)


def test_weighted_prompt_scales_its_tokens(pipe: StableDiffusionPipeline) -> None:
    plain = plain_encoding(pipe, ["a cat"])
    weighted = pipe.encode_prompt("a (cat:1.5)")
    ratio = weighted / plain
    assert ratio[0, 2] / ratio[0, 1] == pytest.approx(torch.full((32,), 1.5), rel=1e-4)
    assert weighted.mean() == pytest.approx(float(plain.mean()), abs=1e-6)


def test_long_prompts_generate_an_image(pipe: StableDiffusionPipeline) -> None:
    out = pipe.text_to_image(LONG_PROMPT + " BREAK (sharp:1.2)", "[blurry]", steps=2, generator=0, progress=False)
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()


# ---- clip skip --------------------------------------------------------------------------------------------------


def test_clip_skip_is_a1111s_hidden_state_through_the_final_norm() -> None:
    ours, hf = ours_and_hf(CLIPTextConfig(width=32, layers=3, heads=2, mlp_width=64))
    final_norm = getattr(hf, "text_model", hf).final_layer_norm  # transformers 5 dropped the text_model level
    ids = CLIPTokenizer()("a photo of a cat").input_ids
    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states
        for skip in (1, 2, 3):
            expected = final_norm(hidden[-skip])
            torch.testing.assert_close(ours.encode(ids, clip_skip=skip), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="between 1 and 3"):
        ours.encode(ids, clip_skip=4)


def test_clip_skip_on_the_pipeline_and_the_command_line(pipe: StableDiffusionPipeline, tmp_path: Path,
                                                        capsys) -> None:
    plain = pipe.encode_prompt("a cat")
    pipe.clip_skip = 2
    try:
        skipped = pipe.encode_prompt("a cat")
    finally:
        pipe.clip_skip = 1
    assert not torch.allclose(plain, skipped)
    with pytest.raises(ValueError, match="between 1 and 2"):
        pipe.clip_skip = 3
    code, _, err = run_cli(capsys, "generate", "a cat", "--clip-skip", 0)
    one_error_line(code, err, "--clip-skip must be at least 1")
    model = save_diffusers(tiny_components(UNET, seed=0, tokenizer=write_tokenizer(tmp_path / "tok")),
                           tmp_path / "sd")
    code, _, err = run_cli(capsys, "generate", "a cat", "--model", model, "--clip-skip", 3, "--steps", 1,
                           "-o", tmp_path / "out.png")
    one_error_line(code, err, "clip skip must be between 1 and 2")
    code, stdout, _ = run_cli(capsys, "generate", "(a cat:1.2)", "--model", model, "--clip-skip", 2, "--steps", 1,
                              "-o", tmp_path / "out.png")
    assert code == 0 and (tmp_path / "out.png").is_file(), stdout
