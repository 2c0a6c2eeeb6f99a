"""``generate --prompts FILE``: text and JSON Lines files, per-line options, output names from ``-o``, bad lines
reported by number with nothing written for them, and the model loaded once; each PNG equals the one a single
``generate`` call writes, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentdiff.cli import generate, main
from latentdiff.cli.prompts import LINE_OPTIONS, PromptLine, output_path, read_prompts_file
from latentdiff.pipelines.metadata import read_png_parameters

PROMPTS = ["a red sneaker on the left", "a blue bag at the top"]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reading_text_and_jsonl(tmp_path: Path) -> None:
    text = _write(tmp_path / "p.txt", ["# a comment", "", PROMPTS[0], "   ", PROMPTS[1] + "  "])
    lines, errors = read_prompts_file(text)
    assert errors == [] and [(l.number, l.index, l.options) for l in lines] == [
        (3, 0, {"prompt": PROMPTS[0]}), (5, 1, {"prompt": PROMPTS[1]})]
    jsonl = _write(tmp_path / "p.jsonl", [
        json.dumps({"prompt": PROMPTS[0], "seed": 3, "negative_prompt": "a bag", "guidance": 2, "width": None}),
        "# skipped", json.dumps({"prompt": PROMPTS[1], "colour": "red"}), "{not json",
        json.dumps({"prompt": "x", "steps": "4"}), json.dumps({"steps": 4}), json.dumps(["a list"]),
        json.dumps({"prompt": "y", "n": True})])
    lines, errors = read_prompts_file(jsonl)
    assert [(l.number, l.index, l.options) for l in lines] == [
        (1, 0, {"prompt": PROMPTS[0], "seed": 3, "negative": "a bag", "guidance": 2})]
    assert errors[0] == f"{jsonl}:3: unknown key 'colour' (known: {', '.join(LINE_OPTIONS)})"
    assert [e.split(": ", 1)[0] for e in errors] == [f"{jsonl}:{n}" for n in (3, 4, 5, 6, 7, 8)]
    assert "not JSON" in errors[1] and "'steps' must be int, got \"4\"" in errors[2] and "no \"prompt\"" in errors[3]
    assert "JSON object" in errors[4] and "'n' must be int, got true" in errors[5]


def test_output_names(tmp_path: Path) -> None:
    line = PromptLine(number=7, index=2, options={})
    pattern = str(tmp_path / "o" / "{index:04d}-{line}-{seed}.png")
    assert output_path(pattern, line, 5) == tmp_path / "o" / "0002-7-5.png"
    assert output_path(str(tmp_path / "out.png"), line, 5) == tmp_path / "out-0002.png"
    assert output_path(str(tmp_path / "folder"), line, 5) == tmp_path / "folder" / "0002.png"
    assert output_path(str(tmp_path) + "/", line, 5) == tmp_path / "0002.png"
    with pytest.raises(ValueError, match=r"\{index\}, \{line\} and \{seed\}"):
        output_path("{name}.png", line, 5)


def test_one_call_gives_each_single_calls_bytes_and_loads_once(tmp_path: Path, capsys, monkeypatch) -> None:
    loads = []
    real = generate.load_pipeline
    monkeypatch.setattr(generate, "load_pipeline", lambda *a, **k: loads.append(a) or real(*a, **k))
    file = _write(tmp_path / "prompts.jsonl", [json.dumps({"prompt": PROMPTS[0]}), "",
                                                json.dumps({"prompt": PROMPTS[1], "seed": 8, "steps": 3})])
    assert main(["generate", "--prompts", str(file), "--steps", "2", "--seed", "1", "-o",
                 str(tmp_path / "batch" / "{index}-{seed}.png")]) == 0
    assert len(loads) == 1
    written = sorted(p.name for p in (tmp_path / "batch").iterdir())
    assert written == ["0-1.png", "1-8.png"]
    single = tmp_path / "single.png"
    assert main(["generate", PROMPTS[1], "--steps", "3", "--seed", "8", "-o", str(single)]) == 0
    assert (tmp_path / "batch" / "1-8.png").read_bytes() == single.read_bytes()
    assert read_png_parameters(tmp_path / "batch" / "0-1.png")["prompt"] == PROMPTS[0]


def test_bad_lines_are_reported_by_number(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    file = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": PROMPTS[0]}), json.dumps({"prompt": "x", "cfg": 3}),
                                         json.dumps({"prompt": "y", "steps": 0})])
    capsys.readouterr()
    assert main(["generate", "--prompts", str(file), "--steps", "2", "-o", str(out) + "/"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"latentdiff: {file}:2: unknown key 'cfg' (known: {', '.join(LINE_OPTIONS)})"
    assert err[1] == f"latentdiff: {file}:3: --steps must be a whole number in [1, 10000], got 0"
    assert err[2] == f"latentdiff: error: {file}: 2 bad lines (above); nothing was generated"
    assert not out.exists()
    # A line the model cannot make (a size that is not a multiple of its 8 pixels) is skipped; the others are written.
    file = _write(tmp_path / "q.jsonl", [json.dumps({"prompt": PROMPTS[0], "width": 36}),
                                         json.dumps({"prompt": PROMPTS[1]})])
    assert main(["generate", "--prompts", str(file), "--steps", "2", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"latentdiff: {file}:1: ") and "36" in err[0]
    assert err[-1] == f"latentdiff: error: 1 of 2 lines of {file} failed (line 1); nothing was written for them"
    assert sorted(p.name for p in out.iterdir()) == ["0001.png"]
    # Two lines that would write one file, and a prompt given besides the file.
    file = _write(tmp_path / "r.txt", PROMPTS)
    assert main(["generate", "--prompts", str(file), "-o", str(tmp_path / "same-{seed}.png")]) == 2
    assert "writes" in capsys.readouterr().err
    assert main(["generate", "a cat", "--prompts", str(file)]) == 2
    assert capsys.readouterr().err.strip() == "latentdiff: error: give a prompt or --prompts FILE, not both"
