"""The exceptions dpsgd raises for problems a user can fix. The CLI catches only these."""


class DpsgdError(Exception):
    """Base class of every error dpsgd raises for a problem the user can fix: a one-line message.

    Args:
        message: what is wrong and what is allowed, naming the key, option or file.

    Attributes:
        exit_code: what the CLI exits with (2 for bad input, 1 for a failed run).
    """

    exit_code = 2


class ConfigError(DpsgdError):
    """A config key, value or command-line option is missing, unknown, mistyped or out of range."""


class DataError(DpsgdError):
    """A dataset file is missing, unreadable or malformed."""


class RunDirError(DpsgdError):
    """A run directory is in a state that forbids the requested action (exists, unfinished, corrupt)."""


class TrainingError(DpsgdError):
    """Training diverged (NaN/inf loss) or otherwise cannot continue."""

    exit_code = 1


class OutputError(DpsgdError):
    """Writing results failed (I/O)."""

    exit_code = 1


class AccountingInputError(ConfigError, ValueError):
    """A privacy-accounting input outside what the accountants compute reliably (σ, q, steps, δ, a target ε),
    or too large a job for the accountant asked. Also a ValueError, as the accountants' argument checks
    always were. `parameter` says which input it is ("noise_multiplier", "sampling_rate", "steps", "delta",
    "target_epsilon", "accountant", "curve"), so that the CLI can name the option or config key it came
    from."""

    def __init__(self, message: str, parameter: str):
        super().__init__(message)
        self.parameter = parameter
