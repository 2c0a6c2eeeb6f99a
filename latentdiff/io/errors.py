"""The errors of reading and writing model files; this module imports nothing of latentdiff."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the model."""
