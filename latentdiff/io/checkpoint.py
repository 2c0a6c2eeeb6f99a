"""Native checkpoint files: ``model.safetensors`` (config in its metadata) + ``config.json``, written atomically.

A run directory holds ``checkpoints/step_NNNNNNN/`` folders and a ``checkpoints/latest`` pointer; a new
checkpoint is written into a temporary folder and renamed into place, and the pointer is replaced with
``os.replace``, so a crash at any moment leaves the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from latentdiff.io.atomic import atomic_folder, check_destination, write_text
from latentdiff.io.errors import CheckpointError
from latentdiff.io.state import check_weights, torch_load_weights_only

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TRAIN_STATE_NAME = "train_state.pt"
_STEP_FOLDER = re.compile(r"step_(\d+)")


def checkpoint_step(folder: Path) -> int | None:
    """The step of a ``step_NNNNNNN`` checkpoint folder; None for anything else (a temporary, another file)."""
    match = _STEP_FOLDER.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    """Delete all but the ``keep`` highest-step checkpoint folders (by step number, not by name); the one
    ``latest`` points at is never deleted. ``keep`` <= 0 keeps all."""
    if keep <= 0:
        return
    latest = ckpt_root / "latest"
    pointed = latest.read_text().strip() if latest.is_file() else None
    steps = sorted((checkpoint_step(p), p) for p in ckpt_root.glob("step_*")
                   if p.is_dir() and checkpoint_step(p) is not None)
    for _, old in steps[:-keep]:
        if old.name != pointed:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run_dir: str | Path, step: int, weights: dict[str, torch.Tensor], config: dict[str, Any],
                    train_state: dict[str, Any] | None = None, keep: int = 2,
                    before_commit: Callable[[Path], None] | None = None) -> Path:
    """Write ``checkpoints/step_<step>/`` under ``run_dir`` atomically (a checkpoint of the same step is
    replaced), point ``latest`` at it, then prune to the ``keep`` newest steps.

    ``before_commit(folder)`` may add files to the temporary folder before it is renamed into place."""
    ckpt_root = Path(run_dir) / "checkpoints"
    name = f"step_{step:07d}"
    final = ckpt_root / name
    config = dict(config, step=step)
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    with atomic_folder(final, overwrite=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"latentdiff_config": json.dumps(config),
                                                              "step": str(step)})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE_NAME)
        if before_commit is not None:
            before_commit(tmp)
    write_text(ckpt_root / "latest", name)
    # Prune old checkpoints only after the new one is in place.
    prune_checkpoints(ckpt_root, keep)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """The ``model.safetensors`` meant by ``path``: the file itself, a checkpoint folder, or a run folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        return path
    if (path / WEIGHTS_NAME).is_file():
        return path / WEIGHTS_NAME
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        candidate = path / "checkpoints" / latest.read_text().strip() / WEIGHTS_NAME
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{path} holds no {WEIGHTS_NAME} (nor checkpoints/latest pointing at one)")


def _stored_config(file: Path) -> dict[str, Any] | None:
    """The latentdiff config of a native ``.safetensors`` file: its metadata's, else config.json's beside it."""
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
    if "latentdiff_config" in metadata:
        return json.loads(metadata["latentdiff_config"])
    if (file.parent / CONFIG_NAME).is_file():
        return json.loads((file.parent / CONFIG_NAME).read_text())
    return None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and config of a native checkpoint (the config from the metadata, else config.json beside)."""
    file = resolve_checkpoint(path)
    if file.suffix != ".safetensors":
        raise CheckpointError(f"{file}: native checkpoints are .safetensors files")
    try:
        config = _stored_config(file)
        weights = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from e
    if config is None:
        raise CheckpointError(f"{file} carries no latentdiff config (metadata or {CONFIG_NAME} beside it)")
    if not isinstance(config, dict) or not config:
        raise CheckpointError(f"{file}: its latentdiff config is {'empty' if not config else 'not a mapping'} "
                              f"({str(config)[:40]}); not a model")
    check_weights(weights, file)
    return weights, config


def read_native_config(path: str | Path) -> dict[str, Any] | None:
    """The latentdiff config stored with a native checkpoint (file, checkpoint folder or run folder), without
    reading its weights; None when ``path`` is not one (another format, or nothing readable there)."""
    try:
        file = resolve_checkpoint(path)
        config = _stored_config(file) if file.suffix == ".safetensors" else None
    except Exception:  # unreadable: the format-specific loaders say why
        return None
    return config if isinstance(config, dict) and "task" in config else None


EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


FIRST_STAGE_PREFIX = "first_stage_model."
ENCODER_PARTS = ("encoder.", "quant_conv.")


def swap_decoder(weights: dict[str, torch.Tensor], config: dict[str, Any], first_stage: str | Path) -> dict[str, Any]:
    """Put the decoder of the autoencoder ``first_stage`` into a diffusion model's ``weights`` (in place), after
    checking that its encoder is bit for bit the one the model was trained on: a fine-tuned decoder
    (``train_only: decoder``) decodes the same latents better; another encoder would mean another latent space.
    A mask-conditioned inpainting decoder (``train_only: mask_decoder``) comes along too, and ``config``'s
    first-stage config then says so. Returns what to record about it."""
    ae_weights, ae_config = read_checkpoint(first_stage)
    if ae_config.get("task", "autoencoder") != "autoencoder":
        raise CheckpointError(f"{first_stage} is a {ae_config.get('task')!r} checkpoint, not an autoencoder")
    if config.get("task") != "diffusion":
        raise CheckpointError("--first-stage swaps the decoder of a diffusion model; this is an autoencoder")
    ours = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in weights.items() if k.startswith(FIRST_STAGE_PREFIX)}
    # The mask decoder is an addition: only the rest must match the model's first stage.
    theirs = {k: v for k, v in ae_weights.items() if not k.startswith("mask_decoder.")}
    ours_plain = {k: v for k, v in ours.items() if not k.startswith("mask_decoder.")}
    fs_config = dict(config.get("model", {}).get("first_stage_config") or {})
    ae_model = dict(ae_config.get("model") or {})
    same_arch = ({k: v for k, v in fs_config.items() if k != "mask_decoder"}
                 == {k: v for k, v in ae_model.items() if k != "mask_decoder"}) if fs_config else True
    if (set(ours_plain) != set(theirs) or any(ours_plain[k].shape != theirs[k].shape for k in ours_plain)
            or not same_arch):
        raise CheckpointError(f"{first_stage} is not the same autoencoder architecture as the model's first stage")
    changed = sorted(k for k in ours if k.startswith(ENCODER_PARTS) and not torch.equal(ours[k], ae_weights[k]))
    if changed:
        raise CheckpointError(f"{first_stage} has another encoder than the one this model was trained on "
                              f"({', '.join(changed[:3])} differ): its latents would not be the model's. Only a "
                              "decoder fine-tuned with train_only: decoder can be swapped in")
    for k in [k for k in weights if k.startswith(FIRST_STAGE_PREFIX + "mask_decoder.")]:
        del weights[k]
    for k, v in ae_weights.items():
        weights[FIRST_STAGE_PREFIX + k] = v
    if fs_config:
        fs_config["mask_decoder"] = bool(ae_model.get("mask_decoder", False))
        config["model"] = dict(config["model"], first_stage_config=fs_config)
    return {"first_stage": str(resolve_checkpoint(first_stage)), "first_stage_step": ae_config.get("step")}


def export_model(src: str | Path, dst: str | Path, dtype: str = "float32",
                 settings: dict[str, Any] | None = None, first_stage: str | Path | None = None,
                 overwrite: bool = False) -> Path:
    """Write the weights a model samples with (a run's latest checkpoint, a checkpoint folder or file) to the
    folder ``dst`` as ``model.safetensors`` + ``config.json``, without the training state: what a model that
    ships with the project, or is handed to someone, needs.

    ``dtype`` stores the floating-point tensors in float16 or bfloat16 to halve the file; the loaders cast them
    back to the model's float32 parameters (``load_state_dict`` copies across dtypes), so only the storage is
    rounded. ``settings`` are top-level config entries to record or override (``sample_guidance``, say, the
    guidance scale the pipelines use when a call gives none). The source's step and training config stay in
    the config, and ``exported_from`` names the source. ``first_stage``: an autoencoder whose decoder replaces
    the model's (see :func:`swap_decoder`). The folder is written atomically; an existing ``dst`` is refused
    unless ``overwrite`` (then replaced as a whole)."""
    check_destination(dst, overwrite)
    if dtype not in EXPORT_DTYPES:
        raise CheckpointError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    file = resolve_checkpoint(src)
    weights, config = read_checkpoint(file)
    swapped = swap_decoder(weights, config, first_stage) if first_stage else {}
    target = EXPORT_DTYPES[dtype]
    nonfinite = sorted(k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if nonfinite:
        raise CheckpointError(f"{file} holds NaN or infinite weights ({', '.join(nonfinite[:4])}); not exported")
    tensors = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    if target != torch.float32:
        big = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
        if big:
            raise CheckpointError(f"{', '.join(big[:4])} overflow {dtype}; export in float32")
    config = dict(config, **(settings or {}))
    config["exported_from"] = {"checkpoint": str(file), "step": config.get("step"), "dtype": dtype, **swapped}
    out = Path(dst)
    with atomic_folder(out, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"latentdiff_config": json.dumps(config),
                                                              "step": str(config.get("step"))})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return out / WEIGHTS_NAME


def load_train_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    file = Path(checkpoint_dir) / TRAIN_STATE_NAME
    if not file.is_file():
        raise CheckpointError(f"{checkpoint_dir} has no {TRAIN_STATE_NAME}: it cannot be resumed")
    # weights_only: a checkpoint never gets to run code on load.
    state = torch_load_weights_only(file)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a training state")
    return state
