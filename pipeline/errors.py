"""Errors raised for bad input. Each subclasses the builtin a caller would catch, names the bad
value and says how to fix it."""


class ConfigError(ValueError):
    """A configuration value is invalid or inconsistent with existing data."""


class HookNotFoundError(KeyError):
    """A hook point name does not resolve to a module of the model."""

    def __str__(self) -> str:  # KeyError would repr() the message and hide the newlines
        return str(self.args[0])


class EmptyDataError(ValueError):
    """A data source yielded no text."""


class StoreError(OSError):
    """An activation store cannot be read or written."""


class StoreIncompleteError(StoreError):
    """An activation store has no commit marker: it is still being written or its writer died."""


class StoreMismatchError(ConfigError):
    """An existing store was written with a different configuration."""


class StorageAccessError(StoreError):
    """The storage behind a URL is unreachable or refuses our credentials."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; a checkpoint of the last finite state was saved."""


class ScalingFitError(ConfigError):
    """A scaling-law fit cannot be made from the sweep: too few finished runs, or runs that cannot
    be compared (different architectures, widths or held-out stores)."""
