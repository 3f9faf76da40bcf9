"""Exceptions raised for bad user input.

Every message names the offending file or config key and says what was expected, so that the
command line can print it as one line without a traceback (see `launch/main.py`).
"""

from __future__ import annotations


class Ssl3dError(Exception):
    """Base class of all user-facing errors of ssl3d_jax."""


class DataError(Ssl3dError, ValueError):
    """A data file or folder is missing, unreadable, or holds values we cannot use."""


class ConfigError(Ssl3dError, ValueError):
    """A config key holds a value we cannot use."""


class CheckpointError(Ssl3dError, ValueError):
    """A checkpoint is missing, or does not fit the model it should initialise."""
