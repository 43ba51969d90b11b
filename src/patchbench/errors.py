"""Errors a person can act on. Kept free of heavy imports: the command line catches them
before torch is loaded (``patchbench --help`` stays fast)."""


class MissingChunkError(RuntimeError):
    """``overwrite="never"`` and a result is not in the store."""


class ModelChangedError(RuntimeError):
    """A method changed the model's weights (they have been restored): that method fails."""


class WeightsLostError(RuntimeError):
    """The weights could not be put back: the whole run must stop."""
