"""Exceptions shared across layers.

Every message here is read by an operator at three in the morning: it names the setting (by its
upstream environment-variable name) and what is wrong with it, and never contains a secret.
"""

from __future__ import annotations

ENV_PREFIX = "keyConnectorSettings__"


def setting_name(path: str) -> str:
    """The environment-variable spelling operators use for a settings path like ``database.provider``."""
    return ENV_PREFIX + path.replace(".", "__")


class KeyConnectorError(Exception):
    """Base class: anything the service raises on purpose."""


class ConfigurationError(KeyConnectorError):
    """A setting is missing or wrong. ``setting`` is its dotted path, e.g. ``rsaKey.provider``."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"{setting_name(setting)}: {problem}")


class UsageError(ConfigurationError):
    """A wrong or missing command-line argument: exits 2 like a wrong setting, named by its option."""

    def __init__(self, option: str, problem: str) -> None:
        self.setting = option
        self.problem = problem
        KeyConnectorError.__init__(self, f"{option}: {problem}")


class MissingDependencyError(ConfigurationError):
    """A provider's optional package is not installed; the message names the extra to install."""

    def __init__(self, setting: str, provider: str, extra: str, module: str) -> None:
        super().__init__(
            setting,
            f"the '{provider}' provider needs the Python package '{module}', which is not installed; "
            f"install it with: pip install 'keyconnector[{extra}]'",
        )


class UnavailableError(KeyConnectorError):
    """A dependency (database, key provider, identity server) cannot be reached right now.

    The HTTP layer turns it into 503 with ``Retry-After``; the process never dies of it.
    """

    def __init__(self, component: str, problem: str, retry_after: int = 5) -> None:
        self.component = component
        self.problem = problem
        self.retry_after = retry_after
        super().__init__(f"{component} is unavailable: {problem}")


class StorageError(KeyConnectorError):
    """The database answered, but not as expected (schema mismatch, corrupt file)."""


class IntegrityFailure(KeyConnectorError):
    """A stored record does not decrypt: it was altered, moved to another user, or the key is wrong.

    Not ``IntegrityError``: that is what every database driver calls a violated constraint, and the
    two must never be caught for each other."""
