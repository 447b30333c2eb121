"""Errors whose message is meant for the user as it is (no traceback needed)."""

from qwenvl_ft.config.schema import ConfigError


class DataError(ValueError):
    """A data row or file is unusable. The message names the file, the row and the field."""


class HubError(RuntimeError):
    """An upload to the Hugging Face Hub failed. The message says why, what is saved locally and how to retry."""


UserFacingError = (ConfigError, DataError, HubError)
