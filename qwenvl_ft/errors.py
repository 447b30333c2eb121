"""Errors whose message is meant for the user as it is (no traceback needed)."""

from qwenvl_ft.config.schema import ConfigError


class DataError(ValueError):
    """A data row or file is unusable. The message names the file, the row and the field."""


UserFacingError = (ConfigError, DataError)
