"""Errors whose message is meant for the user as it is (no traceback needed), and the range-check helper of every
config dataclass. The bottom of the package: it imports nothing of qwenvl_ft, so declarations anywhere (config
groups, training methods, reward options) can raise these without importing the schema they are part of."""


class ConfigError(ValueError):
    """A config value is out of range or inconsistent with another value."""


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition` holds (the range checks of every config dataclass)."""
    if not condition:
        raise ConfigError(message)


class DataError(ValueError):
    """A data row or file is unusable. The message names the file, the row and the field."""


class HubError(RuntimeError):
    """An upload to the Hugging Face Hub failed. The message says why, what is saved locally and how to retry."""


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss, gradient or weight. The message names the step, the last finite loss,
    the learning rate and the checkpoint kept; the run exits with `exit_status` (not 2: the config was valid)."""

    exit_status = 3


UserFacingError = (ConfigError, DataError, HubError, TrainingDiverged)
