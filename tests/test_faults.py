"""Fault injection: kill -9 while ``convert``, ``export`` and ``generate`` write, a full disk (a small tmpfs, as
root), two trainings on one run folder, a fresh run into an old one, a stale lock. Each ends with no lost or
corrupt file, nothing half-written left behind, and one clear line. (kill -9 during training and checkpoint
writing: tests/test_train_diffusion.py.)"""

import contextlib
import errno
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_golden import tiny_sd_file
from test_train_diffusion import TINY
from test_trainer import ToyExperiment, ToyTrainer, train

from latentdiff.cli import main
from latentdiff.formats import read_components
from latentdiff.io.atomic import atomic_folder, atomic_path, remove_stale_temps, write_text
from latentdiff.io.checkpoint import load_train_state, read_checkpoint, save_checkpoint
from latentdiff.io.errors import RunLockedError, WriteError
from latentdiff.io.runs import LOCK_NAME, claim_run
from latentdiff.train.loop import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "scenes-txt2img"
GENERATE = ["generate", "a red bag", "--steps", "2", "--seed", "1"]
# A slow disk: every fsync takes 0.15 s, which widens the moments in which a write can be killed.
SLOW_DISK = ("import os, sys, time\n"
             "fsync = os.fsync\n"
             "os.fsync = lambda fd: (time.sleep(0.15), fsync(fd))[1]\n"
             "from latentdiff.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                                   os.environ.get("PYTHONPATH")])))


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory) -> Path:
    """A tiny random SD v1 single file (the golden tests')."""
    return tiny_sd_file(tmp_path_factory.mktemp("sd"))


def temporaries(folder: Path) -> list[str]:
    """What an interrupted write leaves: ``.NAME.tmp-*`` files, ``NAME.tmp-*`` / ``NAME.old-*`` folders."""
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return re.findall(r"latentdiff: error: [^\r\n]*", err)  # a progress bar may end without a newline


def run_fails(capsys, argv: list, code: int = 2) -> str:
    """Run the CLI in-process; it must exit ``code`` with one error line, which is returned."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------- kill -9


def kill_while_writing(argv: list, watch: Path, seed: int) -> bool:
    """Start the CLI with ``argv`` on a slow disk, kill -9 it at a random moment after it began writing (a
    temporary appeared in ``watch``); True when it was killed (not finished first)."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_DISK, *map(str, argv)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while proc.poll() is None and not temporaries(watch) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.0, 0.2))
    proc.send_signal(signal.SIGKILL)
    return proc.wait() == -signal.SIGKILL


def load_png(path: Path) -> bytes:
    with Image.open(path) as image:
        image.load()  # a truncated file fails here
    return path.read_bytes()


def load_export(path: Path) -> None:
    read_checkpoint(path)


def load_diffusers(path: Path) -> None:
    assert read_components(path).unet is not None


KILLED_COMMANDS = {  # verb: (argv with {src}/{dst}, the destination exists before, its loader, kills)
    "generate": ([*GENERATE, "-o", "{dst}"], True, load_png, 1),
    "export": (["export", MODEL, "{dst}"], False, load_export, 1),
    "convert": (["convert", "{src}", "{dst}", "--to", "diffusers"], False, load_diffusers, 2),  # the most files
}


@pytest.mark.parametrize("verb", list(KILLED_COMMANDS))
def test_kill_9_while_writing_leaves_the_old_or_the_new_output_whole(verb, tmp_path, capsys, request):
    template, exists_before, load, kills = KILLED_COMMANDS[verb]
    src = request.getfixturevalue("sd_file") if verb == "convert" else None
    work = tmp_path / "work"
    dst = work / ("out.png" if verb == "generate" else "out")
    argv = [str(a).format(src=src, dst=dst) for a in template]
    if exists_before:  # a good image to be replaced
        work.mkdir()
        Image.new("RGB", (8, 8), (200, 30, 30)).save(dst)
    killed = 0
    for seed in range(kills):
        killed += kill_while_writing(argv + (["--overwrite"] if dst.exists() and verb != "generate" else []),
                                     work, seed)
        if dst.exists() or exists_before:
            load(dst)  # whole: the old one, or the new one
    assert killed >= 1, "the command finished before it could be killed"
    # The next run writes the output and clears what the killed ones left.
    assert main(argv + (["--overwrite"] if dst.exists() and verb != "generate" else [])) == 0, capsys.readouterr()
    load(dst)
    assert temporaries(work) == []


# ----------------------------------------------------------------------------------------------- full disk


@pytest.fixture
def disk(tmp_path):
    """A 48 MB tmpfs (a disk that can be filled); skipped unless running as root where mounting works."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill needs root")
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("mount -t tmpfs failed here (no CAP_SYS_ADMIN)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path, leave: int = 0) -> None:
    """Fill ``disk`` up to ``leave`` bytes of free space."""
    with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - leave
            if free <= 0:
                break
            f.write(b"\0" * min(free, 1 << 20))
            f.flush()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_full_disk_ends_generate_export_and_convert_in_one_line_and_keeps_the_old_output(disk, sd_file, capsys):
    sd = sd_file
    image, export, pipeline = disk / "out.png", disk / "export", disk / "pipeline"
    assert main([*GENERATE, "-o", str(image)]) == 0
    assert main(["export", str(MODEL), str(export), "--dtype", "float16"]) == 0
    assert main(["convert", str(sd), str(pipeline), "--to", "diffusers"]) == 0
    before = snapshot(disk)
    fill(disk)
    for argv, dst in (([*GENERATE, "--seed", "2", "-o", image], image),
                      (["export", MODEL, export, "--overwrite", "--dtype", "float16"], export),
                      (["convert", sd, pipeline, "--to", "diffusers", "--overwrite"], pipeline)):
        line = run_fails(capsys, argv)
        assert line.startswith("latentdiff: error: disk full while writing ") and str(dst) in line, line
    with pytest.raises(WriteError, match=f"^disk full while writing {disk / 'state.pt'}$"), \
            atomic_path(disk / "state.pt") as temp:
        torch.save({"w": torch.zeros(1 << 16)}, temp)  # torch's "[enforce fail at inline_container.cc]"
    (disk / "filler").unlink()
    assert snapshot(disk) == {k: v for k, v in before.items() if k != "filler"}  # nothing lost, nothing left


def test_a_full_disk_while_checkpointing_ends_in_one_line_and_keeps_the_last_checkpoint(disk, first_stage,
                                                                                        capsys):
    run = disk / "run"
    common = ["train", "configs/ldm-fmnist-class.yaml", *TINY, f"model.first_stage={first_stage}",
              "train.device=cpu", "train.sample_every=100"]
    assert main([*common, "train.steps=2", f"train.out_dir={run}"]) == 0
    fill(disk, leave=64 * 1024)  # room for the log and config, not for a checkpoint
    line = run_fails(capsys, ["train", "--resume", run, "train.steps=4"])
    assert line == f"latentdiff: error: disk full while writing {run / 'checkpoints' / 'step_0000004'}"
    assert (run / "checkpoints" / "latest").read_text() == "step_0000002"
    read_checkpoint(run)
    assert load_train_state(run / "checkpoints" / "step_0000002")["step"] == 2
    assert temporaries(run) == [] and not (run / LOCK_NAME).exists()
    (disk / "filler").unlink()
    assert main(["train", "--resume", str(run), "train.steps=4"]) == 0  # space again: it goes on
    assert (run / "checkpoints" / "latest").read_text() == "step_0000004"


def test_write_errors_name_the_path(tmp_path):
    folder = tmp_path / "x.safetensors"
    folder.mkdir()
    with pytest.raises(WriteError, match=f"^a folder is in the way while writing {folder}$"):
        write_text(folder, "weights")
    for error, reason in ((OSError(errno.ENOSPC, "No space left on device"), "disk full"),
                          (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
                          (Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
                           "disk full"),  # safetensors' SafetensorError
                          (RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with "
                                        "strerror: Is a directory"), "a folder is in the way")):  # torch.save's
        with pytest.raises(WriteError, match=f"^{reason} while writing {tmp_path / 'a.pt'}$"), \
                atomic_path(tmp_path / "a.pt"):
            raise error
    with pytest.raises(ValueError, match="unrelated"), atomic_path(tmp_path / "c.txt") as temp:
        temp.write_text("half")
        raise ValueError("unrelated")  # other errors pass unchanged; the temporary goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


# ------------------------------------------------------------------------------------- atomic outputs, refusals


def test_outputs_are_never_replaced_without_overwrite(tmp_path, sd_file, capsys):
    export, pipeline = tmp_path / "export", tmp_path / "pipeline"
    assert main(["export", str(MODEL), str(export)]) == 0
    before = snapshot(export)
    assert run_fails(capsys, ["export", MODEL, export]) == \
        f"latentdiff: error: {export} already exists: give --overwrite to replace it"
    assert snapshot(export) == before
    # convert --to native into a run folder: refused, its `latest` untouched; with --overwrite a clean folder.
    assert run_fails(capsys, ["convert", export, export, "--to", "native"]).endswith("give --overwrite to replace it")
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "stray.bin").write_text("an old file")
    sd = sd_file
    assert run_fails(capsys, ["convert", sd, pipeline, "--to", "diffusers"]).endswith("--overwrite to replace it")
    assert main(["convert", str(sd), str(pipeline), "--to", "diffusers", "--overwrite"]) == 0
    assert not (pipeline / "stray.bin").exists() and (pipeline / "model_index.json").is_file()
    assert temporaries(tmp_path) == []


def test_a_failed_folder_write_leaves_nothing_and_stale_temporaries_are_cleared(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(KeyError), atomic_folder(target) as folder:
        (folder / "half.safetensors").write_bytes(b"half")
        raise KeyError("interrupted")
    assert list(tmp_path.iterdir()) == []
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"model.tmp-{dead.pid}").mkdir()
    (tmp_path / f".out.png.tmp-{dead.pid}-0").write_bytes(b"half")
    (tmp_path / f".out.png.tmp-{os.getpid()}-99").write_bytes(b"ours: still being written")
    remove_stale_temps(target)
    remove_stale_temps(tmp_path / "out.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.png.tmp-{os.getpid()}-99"]


def test_pruning_goes_by_step_number_and_keeps_what_latest_points_at(tmp_path):
    weights, config = {"w": torch.zeros(2)}, {"task": "toy"}
    for step in (4, 6, 9_999_999):
        save_checkpoint(tmp_path, step, weights, config, keep=0)
    save_checkpoint(tmp_path, 10_000_000, weights, config, keep=2)  # its name sorts before step_9999999's
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_10000000", "step_9999999"]
    for step in (20, 30):
        save_checkpoint(tmp_path / "b", step, weights, config, keep=0)
    save_checkpoint(tmp_path / "b", 2, weights, config, keep=1)  # an older step than those there: kept, latest
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step_0000002"
    assert (tmp_path / "b" / "checkpoints" / "step_0000002" / "model.safetensors").is_file()


# -------------------------------------------------------------------------------------------- run folders


def test_a_fresh_run_into_a_run_folder_is_refused_and_overwrite_starts_clean(first_stage, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["train", "configs/ldm-fmnist-class.yaml", *TINY, f"model.first_stage={first_stage}",
              "train.device=cpu", f"train.out_dir={run}"]
    assert main([*common, "train.steps=4"]) == 0
    before = snapshot(run)
    assert run_fails(capsys, [*common, "train.steps=2"]) == (
        f"latentdiff: error: {run} is not empty: continue it with --resume {run}, or start again with --overwrite")
    assert snapshot(run) == before and not (run / LOCK_NAME).exists()
    assert main([*common, "train.steps=2", "train.seed=7", "--overwrite"]) == 0
    # Only the new run is left: its config, its log rows, its checkpoint (the old step 4 is gone), resumable.
    assert "seed: 7" in (run / "config.yaml").read_text()
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000002"]
    assert main(["train", "--resume", str(run), "train.steps=4"]) == 0
    assert (run / "checkpoints" / "latest").read_text() == "step_0000004"


def test_two_trainings_on_one_folder_the_second_is_refused_the_first_completes(first_stage, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "configs/ldm-fmnist-class.yaml", *TINY, f"model.first_stage={first_stage}", "train.device=cpu",
            "train.steps=4", "train.ckpt_every=2", "train.log_every=2", "train.sample_every=100",
            f"train.out_dir={run}"]
    first = subprocess.Popen([sys.executable, "-m", "latentdiff.cli", *argv], cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / "config.yaml").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    for second in (argv, ["train", "--resume", run]):
        line = run_fails(capsys, second)
        assert f"{run} is in use by process {first.pid} on {socket.gethostname()}" in line, line
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [2, 4]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000004"
    assert load_file(str(run / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert not (run / LOCK_NAME).exists() and temporaries(run) == []


def test_a_stale_lock_is_taken_over_and_a_live_one_elsewhere_is_not(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    (run / f".log.csv.tmp-{dead.pid}-3").write_text("step")  # what it left half-written
    train(run, 3)
    assert f"its process {dead.pid} is gone" in caplog.text
    assert temporaries(run) == []
    assert not (run / LOCK_NAME).exists() and (run / "checkpoints" / "latest").read_text() == "step_0000003"
    # A lock of another host cannot be checked: refused, and the run left as it was.
    (run / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    toy = ToyTrainer(ToyExperiment(train=TrainConfig(out_dir=str(run), steps=6, device="cpu")), resume=run)
    with pytest.raises(RunLockedError, match="in use by process 1 on elsewhere"):
        toy.run()
    assert (run / "checkpoints" / "latest").read_text() == "step_0000003"
    (run / LOCK_NAME).unlink()
    (run / "checkpoints" / f"step_0000009.tmp-{dead.pid}").mkdir()  # a checkpoint a killed run left half-written
    train(run, 6, resume=run)
    assert temporaries(run) == [] and (run / "checkpoints" / "latest").read_text() == "step_0000006"
    # A run that fails before writing anything leaves no folder behind; the lock goes with it.
    with pytest.raises(ValueError), claim_run(tmp_path / "new"):
        raise ValueError("bad data")
    assert not (tmp_path / "new").exists()
