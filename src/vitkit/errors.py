"""vitkit's exceptions. User mistakes are ``ValueError`` subclasses, so ``except ValueError`` works."""

from __future__ import annotations


class VitkitError(Exception):
    """Base class of every error vitkit raises on purpose."""


class ConfigError(VitkitError, ValueError):
    """A configuration value or key is wrong (names what was expected and what came)."""


class InputError(VitkitError, ValueError):
    """A tensor or file given to the model has the wrong shape, type or content."""


class CheckpointError(VitkitError, ValueError):
    """A checkpoint cannot be read, is unsafe, or does not match the model."""
