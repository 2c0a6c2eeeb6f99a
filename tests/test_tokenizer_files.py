"""The CLIP tokenizer's text cleaning (ftfy, as the reference) and the Hugging Face folder it writes."""

import json

import pytest
import torch

from latentdiff.conditioning.tokenizer import CLIPTokenizer


def test_text_cleaning_repairs_broken_unicode_with_ftfy() -> None:
    """As CLIP's reference tokenizer: ftfy repairs mojibake and ligatures before HTML unescaping (NFC alone would
    keep "cafÃ©" and "ﬁ", which tokenize differently)."""
    tokenizer = CLIPTokenizer()
    assert torch.equal(tokenizer(["cafÃ© crÃ¨me &amp;amp; ﬁsh"]).input_ids, tokenizer(["café crème & fish"]).input_ids)


@pytest.mark.parametrize("pad_token_id, pad_token", [(None, "<|endoftext|>"), (0, "!")])
def test_saved_folder_reads_back_and_loads_in_transformers(tmp_path, pad_token_id, pad_token) -> None:
    ours = CLIPTokenizer(pad_token_id=pad_token_id)
    folder = ours.save_folder(tmp_path / "tokenizer")
    assert json.loads((folder / "special_tokens_map.json").read_text())["pad_token"] == pad_token
    assert not list(folder.glob(".*.tmp"))
    back = CLIPTokenizer(folder)
    assert back.encoder == ours.encoder and back.merge_ranks == ours.merge_ranks
    assert back.pad_token_id == ours.pad_token_id
    transformers = pytest.importorskip("transformers")
    theirs = transformers.CLIPTokenizer.from_pretrained(folder)
    prompt = "a red sneaker on the left, 2 blue bags (on the right)"
    want = theirs(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ours([prompt]).input_ids, want)
