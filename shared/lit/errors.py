"""User-facing errors: each carries one clear line that names the file, key or shape at fault."""

from __future__ import annotations


class FormerlabError(Exception):
    """An error caused by the user's input (config, data, checkpoint); the runner prints its message alone."""


class ConfigError(FormerlabError):
    """A config value or key that cannot work (a typo, a wrong type, an unknown project)."""


class DatasetError(FormerlabError):
    """A dataset path that is missing or does not follow the documented layout."""


class CheckpointError(FormerlabError):
    """A checkpoint that cannot be read or belongs to another model."""


class MissingExtraError(FormerlabError, ImportError):
    """An optional package is needed; the message names the extra that installs it."""


class NonFiniteLossError(FormerlabError):
    """The training loss became NaN or Inf."""


def require(module: str, extra: str, purpose: str):
    """Import an optional module, or fail with the `pip install` line that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{purpose} needs the package '{module.split('.')[0]}': install it with `pip install -e '.[{extra}]'`"
        ) from exc
