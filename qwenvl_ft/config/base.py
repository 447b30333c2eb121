"""What every config module shares: the error type and the range-check helper.

Kept apart from schema.py so that modules which declare config dataclasses of their own (training methods in
qwenvl_ft/methods/) can import it without importing the schema they extend.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is out of range or inconsistent with another value."""


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition` holds (the range checks of every config dataclass)."""
    if not condition:
        raise ConfigError(message)
