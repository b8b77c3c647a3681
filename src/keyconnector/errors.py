"""Exceptions shared across layers, and the map of every exception keyconnector raises on purpose.

Every message here is read by an operator at three in the morning: it names the setting (by its
upstream environment-variable name) and what is wrong with it, and never contains a secret.

The tree below is every class of the package that derives from ``KeyConnectorError``, with the
module that defines it and who raises it (``tests/test_errors.py`` checks it against the real
hierarchy, so a new class or a move shows up here)::

    KeyConnectorError           errors: the base; anything raised on purpose
    +-- ConfigurationError      errors: a setting is missing or wrong (settings, provider factories)
    |   +-- UsageError          errors: a command-line option is missing or wrong (cli, ops)
    |   +-- MissingDependencyError  errors: a provider's optional package is not installed
    |   +-- KeyPairMissing      errors: the key pair's file is missing or not a key pair (certificates)
    +-- UnavailableError        errors: the database, key provider or identity server is down now
    +-- StorageError            errors: the database answered, but not as expected (storage backends)
    |   +-- NewDataKeyRefused       core.keyring: user records but no data key, and none may be made
    +-- IntegrityFailure        errors: stored data does not decrypt or authenticate
    |   +-- RecordIntegrityFailure  core.service: a user's record does not open for that user
    |   +-- UnknownVersionError     core.envelope: a record needs a data-key version not loaded
    |   +-- LegacyRefusedError      core.envelope: an upstream-format record the ring refuses
    |   +-- RingRefused             core.keyring: the stored key ring fails authentication
    |   +-- ForeignDataKey          core.keyring: the stored data key does not open with this key pair
    +-- KeyRingConflict         core.keyring: another process changed the key ring meanwhile
    +-- RotationRefused         core.keyring: the ring is not in a state where the change is safe
    +-- NotAdopted              core.keyring: no authenticated ring, and the caller may not write one
    +-- OperationFailed         ops: some records of an operation failed, the others were done
    +-- SideError               ops.transfer: the source or the target of a transfer cannot be opened
    +-- BackupError             ops.backup.format: a backup cannot be written, read or trusted

What the callers do with them:

- HTTP (``keyconnector.http.handlers``): ``UnavailableError`` is 503 with its ``Retry-After``;
  ``IntegrityFailure`` (in practice ``RecordIntegrityFailure``) is 500, logged with the request id,
  audited as ``integrity``, the key never returned. Anything else (``StorageError`` above all) is the
  request middleware's last-resort 500, logged with its traceback. The key service itself absorbs
  the key-ring branch: ``UnknownVersionError`` and ``LegacyRefusedError`` make it read the ring again
  and retry once (``core.trusted``); a ``RingRefused`` keeps the keys trusted before serving, counted
  in /metrics and shown by /health/ready. A ``ConfigurationError`` never reaches a request: the
  worker does not start.
- ``serve``'s pre-flight (``runtime.server``): ``UnavailableError`` and ``RingRefused`` are logged and
  the service starts anyway, answering 503 until the key provider or a good ring is back; a
  ``ConfigurationError`` stops it, exit 2.
- Commands (``keyconnector.cli.main``) exit with ``exit_code_for(exc)``: ``ConfigurationError`` and
  its subclasses 2 (fix the setting or option), ``UnavailableError`` 3 (try again when the dependency
  is back), every other ``KeyConnectorError`` 1, each with its message on one line and no
  traceback; anything else is a bug, 70 (its traceback with ``-v``). Operations turn the key-ring
  branch into their own words first (``backup`` and ``restore`` wrap ``RingRefused``, ``NotAdopted``
  and ``KeyRingConflict`` into ``BackupError``; ``check`` and ``stats`` report ``NotAdopted`` and
  ``RingRefused`` as a result line), and a run stopped by ``KeyRingConflict``, ``OperationFailed`` or
  a changed ring is safe to run again.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable

ENV_PREFIX = "keyConnectorSettings__"

CONFIG_FILE_ENV = "KEYCONNECTOR_CONFIG"
"""Environment variable naming an appsettings-style JSON file (what ``serve --config`` sets). Here,
beside ``ENV_PREFIX``, rather than in the settings loader, so that the command line's help (and shell
completion, which builds it on every Tab) can name it without importing pydantic."""


def setting_name(path: str) -> str:
    """The environment-variable spelling operators use for a settings path like ``database.provider``."""
    return ENV_PREFIX + path.replace(".", "__")


def did_you_mean(given: str, choices: Iterable[str], *, cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the choice closest to ``given``, or ``""`` when none is close.

    Why here: a misspelt provider value (``postgress``) or setting name is the commonest mistake in
    an env file, and the list of every choice that follows it still leaves the operator comparing
    letters. Only the choices are ever quoted back, never anything but what was given as a name."""
    options = list(choices)
    close = difflib.get_close_matches(given.lower(), [c.lower() for c in options], n=1, cutoff=cutoff)
    if not close:
        return ""
    match = next(c for c in options if c.lower() == close[0])
    return f"; did you mean '{match}'?"


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


KEY_PAIR_ADVICE = (
    "if this deployment has run before, restore the PFX that wrapped its data key from a backup (a new key "
    "pair can never open that data key); only for a new deployment make one with `keyconnector init`"
)
"""What to do about a missing key pair when nobody has looked at the database (see KeyPairMissing)."""


class KeyPairMissing(ConfigurationError):
    """The key pair's file (a PFX, PEM or DER certificate) is not there, or is not a key pair at all.

    What to do depends on what only the composition can see: a database holding a data key needs
    the key pair that wrapped it back (from a backup), and only a new deployment may make a new one
    with ``keyconnector init``. The certificate sources raise this with ``missing`` (what is wrong,
    without advice) and a message carrying the advice for both cases; ``runtime.assemble`` looks at
    the database and replaces it with the one that applies."""

    def __init__(self, setting: str, missing: str) -> None:
        self.missing = missing
        super().__init__(setting, f"{missing}; {KEY_PAIR_ADVICE}")


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


class ExitCode(enum.IntEnum):
    """What every ``keyconnector`` command exits with: one table for scripts (README, ``--help``)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    UNAVAILABLE = 3
    INTERNAL = 70


EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "success (check: every check passed)",
    ExitCode.FAILED: "it ran and found failures (a failed check, records that failed, a broken audit chain)",
    ExitCode.USAGE: "configuration or usage error (a wrong setting, a missing file, a wrong option)",
    ExitCode.UNAVAILABLE: "a dependency is unreachable (the database, key provider, identity server)",
    ExitCode.INTERNAL: "a bug (run again with -v for the traceback, and please report it)",
}

EXIT_CODE_TABLE = "\n".join(f"  {code.value:<3} {meaning}" for code, meaning in EXIT_CODE_MEANINGS.items())
"""The exit-code table as ``--help`` and the README print it."""


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code of a command stopped by ``exc`` (see ``ExitCode``)."""
    if isinstance(exc, ConfigurationError):
        return ExitCode.USAGE
    if isinstance(exc, UnavailableError):
        return ExitCode.UNAVAILABLE
    if isinstance(exc, KeyConnectorError):
        return ExitCode.FAILED
    return ExitCode.INTERNAL
