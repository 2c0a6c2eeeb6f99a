"""The errors of reading and writing model files; this module imports nothing of latentdiff."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


class WriteError(OSError):
    """A file or folder that could not be written (disk full, quota, read-only file system, a folder in the way);
    the message names the path."""


class RunLockedError(OSError):
    """A run folder that another training process holds (its ``.lock`` names the process)."""
