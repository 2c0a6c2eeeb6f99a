"""The leaf of file handling: errors, strict state loading and native checkpoint files (tensors + config dicts).

Nothing here imports a model; building models from files is ``latentdiff.formats``'s job, one layer above them.
"""

from latentdiff.io.checkpoint import read_checkpoint, resolve_checkpoint, save_checkpoint
from latentdiff.io.errors import CheckpointError
from latentdiff.io.state import load_state_strict

__all__ = ["CheckpointError", "load_state_strict", "read_checkpoint", "resolve_checkpoint", "save_checkpoint"]
