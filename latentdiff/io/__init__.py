"""The leaf of file handling: errors, strict state loading and native checkpoint files (tensors + config dicts).

Nothing here imports a model; building models from files is ``latentdiff.formats``'s job, one layer above them.
Every writer goes through ``io.atomic`` (temporary name, fsync, rename; a full disk is one line naming the path), and
``io.runs`` holds a run folder for one training process (``RUN/.lock``) and refuses a fresh run over an old one.
"""

from latentdiff.io.checkpoint import read_checkpoint, resolve_checkpoint, save_checkpoint
from latentdiff.io.errors import CheckpointError
from latentdiff.io.state import load_state_strict

__all__ = ["CheckpointError", "load_state_strict", "read_checkpoint", "resolve_checkpoint", "save_checkpoint"]
