"""Errors raised for bad input. Each subclasses the builtin a caller would catch, names the bad
value and says how to fix it.

Every error that is the user's to fix (a bad value, a missing or corrupt input, an unreachable
service) also subclasses `UserError`: a stage's command line prints its message alone and exits
with USER_ERROR_EXIT (pipeline/config.py). Any other exception is a bug and keeps its traceback."""

USER_ERROR_EXIT = 2
"""Exit status of a stage stopped by a UserError (1 is Hydra's own for a malformed override)."""


class UserError(Exception):
    """Bad input whose message names the bad value and the fix: no traceback needed to act on it."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid or inconsistent with existing data."""


class HookNotFoundError(UserError, KeyError):
    """A hook point name does not resolve to a module of the model."""

    def __str__(self) -> str:  # KeyError would repr() the message and hide the newlines
        return str(self.args[0])


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder the configuration names does not exist (or is not what it should hold)."""


class EmptyDataError(UserError, ValueError):
    """A data source yielded no text."""


class StoreError(UserError, OSError):
    """An activation store cannot be read or written."""


class StoreIncompleteError(StoreError):
    """An activation store has no commit marker: it is still being written or its writer died."""


class StoreMismatchError(ConfigError):
    """An existing store was written with a different configuration."""


class StorageAccessError(StoreError):
    """The storage behind a URL is unreachable or refuses our credentials."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss; a checkpoint of the last finite state was saved."""


class ScalingFitError(ConfigError):
    """A scaling-law fit cannot be made from the sweep: too few finished runs, or runs that cannot
    be compared (different architectures, widths or held-out stores)."""
