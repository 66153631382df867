"""Exception types raised by the engine. Each one names the problem in its message."""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class DatasetError(EngineError, ValueError):
    """A dataset file is unusable: missing keys, wrong dtypes or shapes, bad labels or ids."""


class DatasetTooLarge(DatasetError):
    """A dataset or events file would inflate past the configured limit."""


class ArchitectureError(EngineError, ValueError):
    """An architecture spec names an unknown architecture or gives bad keyword arguments."""


class CheckpointError(EngineError, ValueError):
    """Weights do not fit the architecture (missing/unexpected keys, shapes) or are not finite."""


class ConfigError(EngineError, ValueError):
    """An unlearner, proxy or RUM configuration is invalid (unknown name or hyperparameter)."""


class Cancelled(EngineError):
    """Raised inside a long computation when its cancellation was requested."""
