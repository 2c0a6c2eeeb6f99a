"""Several processes on one model: DDP or FSDP (PyTorch's ``fully_shard``), the gradient sync of accumulated
micro-batches, and sharded checkpoints (``torch.distributed.checkpoint``, DCP) that resume on any number of
processes.

With ``train.strategy: fsdp`` every process holds 1/W of each trained module's weights, gradients and optimiser
state (``shard``); a block's full weights exist only while its forward or backward runs. Collectives (the
checkpoint's gathers, the sample grids' unsharding) are made by every rank in the same order, which the skeleton
guarantees by calling them at the same steps on every rank.

A sharded checkpoint is ``step_NNNNNNN/dcp/`` (every rank writes its shards; DCP's metadata maps them to global
tensors, so a run saved by 2 processes loads into 1, or 4) beside the usual ``model.safetensors`` (the full weights,
gathered, for sampling and export) and ``train_state.pt`` (step, RNG, the hook's own state). The DCP folder is
written into ``step_NNNNNNN.dcp.tmp`` first and moved into the checkpoint's temporary folder before that is renamed
into place, so a crash leaves no half-written checkpoint.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

DCP_FOLDER = "dcp"


def shard(module: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` every block of ``module`` (each item of its ModuleLists and each child named ``*block``: a
    UNet's input, middle and output blocks), then the root for the rest; in place, returns ``module``.

    Every process first takes rank 0's weights and buffers, as DDP does, so a run starts from one model however
    each process was seeded."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for name, child in module.named_children():
        blocks = list(child) if isinstance(child, nn.ModuleList) else [child] if name.endswith("block") else []
        for block in blocks:
            if any(p.requires_grad for p in block.parameters()):
                fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def gather_full(tree: Any) -> Any:
    """``tree`` (a tensor or nested dicts and lists of them) with every DTensor gathered into a full tensor. A
    collective under FSDP: every rank calls it on the same structure."""
    if isinstance(tree, DTensor):
        return tree.full_tensor()
    if isinstance(tree, dict):
        return {k: gather_full(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(gather_full(v) for v in tree)
    return tree


def shard_like(weights: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors of ``weights`` (a model.safetensors) as the DTensors ``module``'s state dict holds where it is
    sharded (same mesh and placements), so that ``load_state_dict`` takes them; every rank calls it."""
    own = module.state_dict()
    out = {}
    for k, v in weights.items():
        target = own.get(k)
        if isinstance(target, DTensor):
            v = distribute_tensor(v.to(target.device, target.dtype), target.device_mesh, target.placements)
        out[k] = v
    return out


@contextmanager
def gradient_sync(modules: Sequence[nn.Module], enabled: bool) -> Iterator[None]:
    """Within the block the DDP / FSDP ``modules`` reduce their gradients in backward only when ``enabled``:
    off for the micro-batches of an accumulated step but the last, so gradients are exchanged once a step."""
    with ExitStack() as stack:
        if not enabled:
            for module in modules:
                if isinstance(module, DDP):
                    stack.enter_context(module.no_sync())
                elif isinstance(module, FSDPModule):
                    module.set_requires_gradient_sync(False)
                    stack.callback(module.set_requires_gradient_sync, True)
        yield


@contextmanager
def unsharded(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block the FSDP ``modules`` hold their full weights (all-gathered: every rank enters it), and keep
    them through forwards, so that rank 0 alone can sample with them."""
    roots = [m for m in modules if isinstance(m, FSDPModule)]
    inner = [m for root in roots for m in root.modules() if isinstance(m, FSDPModule) and m is not root]
    for module in inner:
        module.set_reshard_after_forward(False, recurse=False)
    for module in [*roots, *inner]:
        module.unshard()
    try:
        yield
    finally:
        for module in [*roots, *inner]:
            module.reshard()
        for module in inner:
            module.set_reshard_after_forward(True, recurse=False)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sharded_state(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                   averages: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, list(optimizers))
    return {"model": model_state, "optim": optim_state, "averages": averages}


def save_sharded(run_dir: Path, step: int, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                 averages: dict[str, dict[str, torch.Tensor]], is_main: bool) -> Path:
    """Every rank: the trained model's raw weights, the optimisers' states and the weight averages' shadows (all
    keyed by parameter name) into ``checkpoints/step_NNNNNNN.dcp.tmp``, which is returned once every rank is done;
    ``commit_sharded`` moves it into the checkpoint."""
    folder = Path(run_dir) / "checkpoints" / f"step_{step:07d}.dcp.tmp"
    if is_main:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    barrier()
    dcp.save(_sharded_state(model, optimizers, averages), checkpoint_id=folder, no_dist=not dist.is_initialized())
    barrier()
    return folder


def commit_sharded(written: Path, checkpoint_tmp: Path) -> None:
    """Rank 0, into the checkpoint's temporary folder before it is renamed into place."""
    os.replace(written, checkpoint_tmp / DCP_FOLDER)


def load_sharded(folder: Path, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                 averages: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every rank: a DCP folder into ``model`` (sharded or not), ``optimizers`` and ``averages`` (loaded into the
    given shadow tensors), whatever the number of processes that wrote it."""
    state = _sharded_state(model, optimizers, averages)
    dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    set_state_dict(model, list(optimizers), model_state_dict=state["model"], optim_state_dict=state["optim"])
