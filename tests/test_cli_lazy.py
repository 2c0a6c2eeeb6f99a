"""The lazy verb table: each verb's group defines exactly the verbs ``VERB_GROUPS`` lists, a verb loads only its
group, and ``latentdiff generate`` starts without the trainers or torch.distributed's checkpointing."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from latentdiff import cli


def _verbs_of(module_name: str) -> set[str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    importlib.import_module(f"latentdiff.cli.{module_name}").add_parsers(sub)
    return set(sub.choices)


@pytest.mark.parametrize("group", list(cli.VERB_GROUPS))
def test_every_group_defines_the_verbs_the_table_lists(group: str) -> None:
    assert _verbs_of(group) == set(cli.VERB_GROUPS[group])


def test_a_verb_loads_only_its_group_and_help_lists_every_verb() -> None:
    choices = cli.build_parser(["generate", "x"])._subparsers._group_actions[0].choices
    assert set(choices) == set(cli.VERB_GROUPS["generate"])
    assert set(cli.build_parser(["-v", "info", "m"])._subparsers._group_actions[0].choices) == {"info"}
    every = {verb for verbs in cli.VERB_GROUPS.values() for verb in verbs}
    for argv in (None, [], ["--help"], ["no-such-verb"]):
        assert set(cli.build_parser(argv)._subparsers._group_actions[0].choices) == every


def test_an_unknown_verb_is_one_line(capsys) -> None:
    assert cli.main(["no-such-verb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-verb" in err[0]


def test_generate_does_not_import_the_trainers() -> None:
    """In a fresh interpreter: parsing a generate command loads no training or distributed-checkpoint code, and
    not ftfy (only a CLIP tokenizer cleaning a prompt needs it) or torch.compile's dynamo (a second)."""
    code = ("import sys; from latentdiff import cli; cli.build_parser(['generate', 'x']).parse_args(['generate', 'x']);"
            "bad = [m for m in ('latentdiff.train', 'latentdiff.eval', 'torch.distributed.checkpoint', "
            "'ftfy', 'torch._dynamo') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
