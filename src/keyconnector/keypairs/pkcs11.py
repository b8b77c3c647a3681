"""The ``pkcs11`` provider: the RSA private key stays on a PKCS#11 token (an HSM, a smart card, SoftHSM).

Upstream's scheme, kept so that data keys move freely between upstream and this service: the data key
is wrapped locally with the certificate's public key (RSA-OAEP, SHA-1, MGF1-SHA-1, no label; or SHA-256
and MGF1-SHA-256 with ``rsaKey.wrapAlgorithm`` = ``RSA-OAEP-256``) and
unwrapped on the token with ``CKM_RSA_PKCS_OAEP`` and the same parameters. The certificate comes from
the certificate settings; it needs no private key, and the token's key never leaves the token.

Settings, under ``rsaKey`` (or ``transferTo.rsaKey``):

- ``pkcs11LibraryPath``: the token's PKCS#11 library. When empty, ``pkcs11Provider`` (``opensc`` or
  ``yubihsm``) picks the first of the usual Debian, Ubuntu, RHEL and container locations that exists;
  with an explicit path, ``pkcs11Provider`` is only a name and may hold anything.
- ``pkcs11SlotTokenSerialNumber``: the token, by the serial number ``pkcs11-tool -L`` or
  ``softhsm2-util --show-slots`` print (compared without case and leading zeros). May stay empty when
  the library shows exactly one token.
- ``pkcs11LoginUserType``: ``user`` (the default), ``so`` or ``context_specific``. PKCS#11 has no
  stand-alone context-specific login: it re-authenticates one operation on a key marked
  ``CKA_ALWAYS_AUTHENTICATE``. So ``context_specific`` logs in as the user, and a key that demands it
  gets the PIN again before every decryption, whatever the user type.
- ``pkcs11LoginPin``. For a YubiHSM 2 it is the authentication key's id in four hex digits followed by
  its password (``0001password``); the library finds its connector through ``YUBIHSM_PKCS11_CONF``.
- ``pkcs11PrivateKeyId`` or ``pkcs11PrivateKeyLabel``. The id is read as upstream's release reads it:
  an unsigned 64-bit number, in decimal or with ``0x``, matched as the ``CKA_ID`` made of its 8 bytes
  in little-endian order (``1`` is ``01 00 00 00 00 00 00 00``); when it is set, the label is ignored
  (with a warning when it names another key), as upstream does. So an upstream env file chooses the
  same key here. This service once documented the id as hex bytes, as ``pkcs11-tool`` prints them; that
  reading is kept only where upstream's cannot apply, so the two can never disagree: ``0a1b``, ``0a:1b``
  and ``0a 1b`` (hex with a letter or a separator) and ``hex:0102`` (explicit) are hex bytes, and a
  value that is not hex at all, or whose hex bytes match no key, is its UTF-8 text. Bare digits and
  ``0x...`` are always upstream's number. The reading that matched is logged and shown by ``check``.

How the library is used, and why:

- One thread per library. Every call into a library runs on that library's single worker thread. This
  serialises the use of the shared session (PKCS#11 sessions are not for concurrent use) without
  parking a thread of the default pool per waiting request, and it honours what python-pkcs11 promises
  the library with ``C_Initialize(NULL)``: no calls from several threads at once.
- One login per token. Login state belongs to the application, not to a session: a second ``C_Login``
  fails with ``CKR_USER_ALREADY_LOGGED_IN``, and closing a logged-in session logs every other session
  on the token out. So the providers of one process that use the same token and user type (the key
  provider and a transfer target on the same HSM, repeated opens by ``keyconnector check`` or tests)
  share one logged-in session, counted, and the last one to close closes it.
- One library object per process. python-pkcs11 keeps one library object per path; loading the same
  file under a second name (Debian links ``pkcs11/opensc-pkcs11.so`` to ``opensc-pkcs11.so``) would
  call ``C_Initialize`` again and fail with ``CKR_CRYPTOKI_ALREADY_INITIALIZED``, so paths are resolved
  first. The library is never finalised, since other providers of the process may still use it.
  Server workers are fresh interpreters (spawned, not forked), so each initialises its own copy.
- Recovery. When an operation fails because the session, the login or the token went away, whatever
  is left is closed and the session is opened and logged in again once, then the operation is retried;
  if that fails too, ``UnavailableError`` (503) and the next request tries again. A ciphertext the
  token refuses is told apart from a sick token by a probe (a fresh ciphertext of our own): if the
  probe unwraps, the stored data key is the problem (``IntegrityFailure``).
- PKCS#11 calls have no timeouts of their own, so each call is awaited for a bounded time only.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ctypes
import functools
import hmac
import logging
import os
import platform
import re
import secrets
import string
import sysconfig
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from keyconnector._optional import require
from keyconnector.certificates import load_certificate
from keyconnector.errors import (
    ConfigurationError,
    IntegrityFailure,
    KeyConnectorError,
    UnavailableError,
    setting_name,
)
from keyconnector.keypairs.base import RSA_OAEP, WrapAlgorithm, wrap_algorithm
from keyconnector.runtime.settings import RsaKeySettings, SideSettings

if TYPE_CHECKING:
    from pkcs11 import DecryptMixin, PrivateKey, Session, Token

log = logging.getLogger("keyconnector.keys.pkcs11")

PROVIDER = "pkcs11"
_MECHANISM_HASHES = {"SHA-1": ("SHA_1", "SHA1"), "SHA-256": ("SHA256", "SHA256")}
"""``WrapAlgorithm.hash_name`` -> the python-pkcs11 ``Mechanism`` and ``MGF`` member names of the
``CKM_RSA_PKCS_OAEP`` parameters (hash, MGF1 hash)."""
OPEN_TIMEOUT = 30.0  # loading a library, finding the token, logging in, proving the key pair
OPERATION_TIMEOUT = 10.0  # one unwrap, including a re-login and a retry
CLOSE_TIMEOUT = 5.0

LIBRARY_FILES = {"opensc": "opensc-pkcs11.so", "yubihsm": "yubihsm_pkcs11.so"}

# python-pkcs11 exception class names. Errors that mean "this ciphertext is not for this key" on tokens
# that say so precisely; SoftHSM answers CKR_GENERAL_ERROR instead, which the probe sorts out.
_BAD_CIPHERTEXT = frozenset({"EncryptedDataInvalid", "EncryptedDataLenRange", "DataInvalid", "DataLenRange"})
# A mechanism parameter the token does not support (an OAEP hash other than SHA-1, say).
_UNSUPPORTED_PARAMETERS = frozenset({"ArgumentsBad", "MechanismParamInvalid", "MechanismInvalid"})
# Errors that mean the token or the session went away rather than anything about the key.
_GONE = frozenset(
    {
        "SessionHandleInvalid",
        "SessionClosed",
        "DeviceRemoved",
        "DeviceError",
        "DeviceMemory",
        "TokenNotPresent",
        "TokenNotRecognised",
        "UserNotLoggedIn",
        "SlotIDInvalid",
        "HostMemory",
    }
)

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True, slots=True)
class _UserType:
    name: str  # as the operator wrote it, normalised
    login: int  # the CKU_* value given to C_Login


_USER_TYPES = {
    "user": _UserType("user", 1),
    "so": _UserType("so", 0),
    "context_specific": _UserType("context_specific", 1),
}
_USER_TYPE_SPELLINGS = {
    "": "user",
    "user": "user",
    "normal": "user",
    "so": "so",
    "security_officer": "so",
    "securityofficer": "so",
    "context_specific": "context_specific",
    "contextspecific": "context_specific",
}


@dataclass(frozen=True, slots=True)
class _Config:
    prefix: str
    library_path: str  # resolved, see the module docstring
    library_setting: str  # the setting that chose it
    serial: str | None
    user_type: _UserType
    pin: SecretStr
    label: str | None  # ignored for the search when key_id_text is set, as upstream does
    key_ids: tuple[KeyIdReading, ...]  # the readings of pkcs11PrivateKeyId, tried in this order
    key_id_text: str | None

    def setting(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    @property
    def key_setting(self) -> str:
        return self.setting("pkcs11PrivateKeyId" if self.key_id_text is not None else "pkcs11PrivateKeyLabel")

    @property
    def key_selector(self) -> str:
        if self.key_id_text is not None:
            return f"with id {self.key_id_text}"
        return f"labelled '{self.label}'"


def _text(value: str | None) -> str | None:
    stripped = (value or "").strip()
    return stripped or None


def default_library_candidates(provider: str) -> list[str]:
    """Where the distributions and vendors put ``provider``'s library, most specific first."""
    filename = LIBRARY_FILES[provider]
    arches: list[str] = []
    for arch in (sysconfig.get_config_var("MULTIARCH"), f"{platform.machine()}-linux-gnu"):
        if isinstance(arch, str) and arch and arch not in arches:
            arches.append(arch)
    folders = [folder for arch in arches for folder in (f"/usr/lib/{arch}", f"/usr/lib/{arch}/pkcs11")]
    folders += ["/usr/lib64", "/usr/lib64/pkcs11", "/usr/lib", "/usr/lib/pkcs11"]
    folders += ["/usr/local/lib", "/usr/local/lib/pkcs11"]
    return [f"{folder}/{filename}" for folder in folders]


def library_path(rsa_settings: RsaKeySettings, prefix: str = "rsaKey") -> tuple[str, str]:
    """The library file to load (resolved) and the setting that chose it, or a ``ConfigurationError``."""
    explicit = _text(rsa_settings.pkcs11_library_path)
    if explicit is not None:
        setting = f"{prefix}.pkcs11LibraryPath"
        if not os.path.exists(explicit):
            raise ConfigurationError(
                setting,
                f"there is no file at {explicit}; install the token's PKCS#11 library or fix the path",
            )
        if os.path.isdir(explicit):
            raise ConfigurationError(setting, f"{explicit} is a directory, not a PKCS#11 library")
        return os.path.realpath(explicit), setting
    provider = (_text(rsa_settings.pkcs11_provider) or "").lower()
    if not provider:
        raise ConfigurationError(
            f"{prefix}.pkcs11Provider",
            "is not set; set it to 'opensc' or 'yubihsm' (each implies the usual library path), or set "
            f"{setting_name(prefix + '.pkcs11LibraryPath')} to the token's PKCS#11 library",
        )
    if provider not in LIBRARY_FILES:
        raise ConfigurationError(
            f"{prefix}.pkcs11Provider",
            f"unknown PKCS#11 provider '{provider}'; choose one of: {', '.join(sorted(LIBRARY_FILES))}, "
            f"or set {setting_name(prefix + '.pkcs11LibraryPath')} to the token's PKCS#11 library",
        )
    candidates = default_library_candidates(provider)
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.realpath(candidate), f"{prefix}.pkcs11Provider"
    raise ConfigurationError(
        f"{prefix}.pkcs11LibraryPath",
        f"is not set, and the {provider} PKCS#11 library is in none of the usual places "
        f"({', '.join(candidates)}); install it or set this setting to its path",
    )


UPSTREAM_NUMBER = "upstream's number"
HEX_BYTES = "hex bytes"
TEXT = "UTF-8 text"
_UINT64_MAX = 2**64 - 1
_SEPARATORS = re.compile(r"[\s:\-]")


@dataclass(frozen=True, slots=True)
class KeyIdReading:
    """One way of reading ``pkcs11PrivateKeyId``: the ``CKA_ID`` it means and how it was read."""

    form: str  # UPSTREAM_NUMBER, HEX_BYTES or TEXT
    cka_id: bytes
    number: int | None = None  # upstream's number, for UPSTREAM_NUMBER

    def describe(self) -> str:
        """For logs, ``check`` and errors: the reading and the bytes, as ``pkcs11-tool`` lists them."""
        spaced = " ".join(f"{byte:02x}" for byte in self.cka_id)
        if self.form == UPSTREAM_NUMBER:
            return f"upstream's number {self.number} (CKA_ID {spaced}, 8 bytes little-endian)"
        if self.form == HEX_BYTES:
            return f"hex bytes (CKA_ID {spaced})"
        return f"UTF-8 text (CKA_ID {spaced})"


def _hex_bytes(digits: str) -> bytes:
    return bytes.fromhex(digits if len(digits) % 2 == 0 else "0" + digits)


def _upstream_number(number: int, text: str, setting: str) -> KeyIdReading:
    if number > _UINT64_MAX:
        raise ConfigurationError(
            setting,
            f"'{text}' is larger than upstream's unsigned 64-bit key id; a longer CKA_ID is written as hex "
            f"bytes with {setting_name(setting)}=hex:<bytes> (as pkcs11-tool --list-objects prints it)",
        )
    return KeyIdReading(UPSTREAM_NUMBER, number.to_bytes(8, "little"), number)


def parse_key_id(text: str, setting: str) -> tuple[KeyIdReading, ...]:
    """The readings of ``pkcs11PrivateKeyId``, best first; a value no rule accepts is refused.

    Upstream's reading (a .NET ``ulong``: decimal, or hexadecimal after ``0x``) comes first and, where
    it applies, alone: a value upstream reads as a number must never find another key here. Our older
    readings (hex bytes, then text) apply only to values upstream cannot read at all. ``#`` and ``&h``
    are refused rather than guessed: .NET's number converters may read them as hexadecimal too.
    """
    value = text.strip()
    lowered = value.lower()
    if lowered.startswith("hex:"):
        digits = _SEPARATORS.sub("", value[4:])
        if not digits:
            raise ConfigurationError(setting, f"'{value}' has no hex digits after 'hex:'")
        if not all(c in string.hexdigits for c in digits):
            raise ConfigurationError(
                setting, f"'{value}' is not hex bytes after 'hex:' (write them as pkcs11-tool prints them)"
            )
        return (KeyIdReading(HEX_BYTES, _hex_bytes(digits)),)
    unsigned = value.removeprefix("+")
    if unsigned.isascii() and unsigned.isdigit():
        return (_upstream_number(int(unsigned), value, setting),)
    if lowered.startswith("0x"):
        digits = value[2:]
        if digits and all(c in string.hexdigits for c in digits):
            return (_upstream_number(int(digits, 16), value, setting),)
        if digits and all(c in string.hexdigits for c in _SEPARATORS.sub("", digits)):
            raise ConfigurationError(
                setting,
                f"'{value}' is neither upstream's 0x number nor hex bytes; for the bytes "
                f"{_SEPARATORS.sub(' ', digits).strip()} write hex:{digits}",
            )
        raise ConfigurationError(setting, f"'{value}' is not a hexadecimal number after '0x'")
    if lowered.startswith(("#", "&h")):
        raise ConfigurationError(
            setting, f"'{value}' is ambiguous; write upstream's key id in decimal or with 0x (such as 0x1a)"
        )
    if value.startswith("-") and value[1:].isascii() and value[1:].isdigit():
        raise ConfigurationError(
            setting, f"'{value}' is not an unsigned number, as upstream's key id must be"
        )
    readings: list[KeyIdReading] = []
    digits = _SEPARATORS.sub("", value)
    if digits and all(c in string.hexdigits for c in digits):
        readings.append(KeyIdReading(HEX_BYTES, _hex_bytes(digits)))
    if all(reading.cka_id != value.encode() for reading in readings):
        readings.append(KeyIdReading(TEXT, value.encode()))
    return tuple(readings)


def _user_type(rsa_settings: RsaKeySettings, prefix: str) -> _UserType:
    raw = (rsa_settings.pkcs11_login_user_type or "").strip().lower().replace("-", "_").replace(" ", "_")
    raw = raw.removeprefix("cku_")
    name = _USER_TYPE_SPELLINGS.get(raw)
    if name is None:
        raise ConfigurationError(
            f"{prefix}.pkcs11LoginUserType",
            f"unknown user type '{rsa_settings.pkcs11_login_user_type}'; choose user, so or context_specific",
        )
    return _USER_TYPES[name]


def _config(rsa_settings: RsaKeySettings, prefix: str) -> _Config:
    path, library_setting = library_path(rsa_settings, prefix)
    pin = rsa_settings.pkcs11_login_pin
    if pin is None or not pin.get_secret_value():
        raise ConfigurationError(
            f"{prefix}.pkcs11LoginPin", "is not set; the token's PIN is needed to use its private key"
        )
    label = rsa_settings.pkcs11_private_key_label
    label = label if label is not None and label.strip() else None
    key_id_text = _text(rsa_settings.pkcs11_private_key_id)
    if label is None and key_id_text is None:
        raise ConfigurationError(
            f"{prefix}.pkcs11PrivateKeyLabel",
            f"neither it nor {setting_name(prefix + '.pkcs11PrivateKeyId')} is set; set one of them to "
            "choose the private key on the token",
        )
    return _Config(
        prefix=prefix,
        library_path=path,
        library_setting=library_setting,
        serial=_text(rsa_settings.pkcs11_slot_token_serial_number),
        user_type=_user_type(rsa_settings, prefix),
        pin=pin,
        label=label,
        key_ids=parse_key_id(key_id_text, f"{prefix}.pkcs11PrivateKeyId") if key_id_text is not None else (),
        key_id_text=key_id_text,
    )


# --------------------------------------------------------------------------------------------------
# Library, token and session (everything below runs on the library's own thread)


def _describe(exc: BaseException) -> str:
    """A PKCS#11 error for a message: python-pkcs11's class name, plus its text when there is one."""
    name, text = type(exc).__name__, str(exc).strip()
    if name == "PKCS11Error":
        return text or "an unknown PKCS#11 error"
    return f"{name} ({text})" if text else name


def _serial(token: Token) -> str:
    return token.serial.decode("ascii", "replace").strip()


def _same_serial(actual: str, wanted: str) -> bool:
    a, w = actual.strip().casefold(), wanted.strip().casefold()
    return a == w or (a.lstrip("0") == w.lstrip("0") != "")


class _Library:
    """A loaded PKCS#11 library, the one thread that calls it, and the logged-in sessions on its tokens."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11")
        self.connections: dict[tuple[str, int], _Connection] = {}  # (token serial, CKU_*) -> session
        self._checked = False

    def load(self, setting: str) -> Any:
        """python-pkcs11's library object; it initialises the library again if someone finalised it."""
        import pkcs11

        if not self._checked:
            # python-pkcs11 folds "not a loadable file" and "C_Initialize failed" into one exception;
            # the first is a setting to fix, the second may be a device that is not there yet.
            try:
                handle = ctypes.CDLL(self.path)
            except OSError as exc:
                raise ConfigurationError(setting, f"cannot load {self.path}: {exc}") from None
            if not hasattr(handle, "C_GetFunctionList"):
                raise ConfigurationError(
                    setting, f"{self.path} is not a PKCS#11 library (it has no C_GetFunctionList)"
                )
            self._checked = True
        try:
            return pkcs11.lib(self.path)
        except pkcs11.PKCS11Error as exc:
            raise UnavailableError(
                f"the key provider pkcs11 ({setting_name(setting)})",
                f"the library {self.path} did not initialise: {_describe(exc)}",
            ) from None

    def find_token(self, config: _Config) -> Token:
        import pkcs11

        serial_setting = config.setting("pkcs11SlotTokenSerialNumber")
        try:
            tokens: list[Token] = [
                token
                for token in self.load(config.library_setting).get_tokens()
                if token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED
            ]
        except pkcs11.PKCS11Error as exc:
            raise _gone(config, f"cannot list the tokens: {_describe(exc)}") from None
        if not tokens:
            raise _gone(
                config,
                f"the library {self.path} shows no initialised token (is the device connected, its "
                "reader or connector running, and the library configured?)",
            )
        present = ", ".join(f"{_serial(token)} ('{token.label}')" for token in tokens)
        if config.serial is None:
            if len(tokens) == 1:
                return tokens[0]
            raise ConfigurationError(
                serial_setting, f"is not set, and the library shows several tokens; choose one of: {present}"
            )
        for token in tokens:
            if _same_serial(_serial(token), config.serial):
                return token
        raise ConfigurationError(
            serial_setting, f"no token has the serial number '{config.serial}'; tokens present: {present}"
        )

    def attach(self, config: _Config) -> _Connection:
        """The logged-in session for ``config``'s token and user type, shared if one exists."""
        token = self.find_token(config)
        key = (_serial(token), config.user_type.login)
        connection = self.connections.get(key)
        if connection is None:
            connection = _Connection(self, config)
            connection.open_session(token)
            self.connections[key] = connection
        elif not hmac.compare_digest(
            connection.config.pin.get_secret_value().encode(), config.pin.get_secret_value().encode()
        ):
            raise ConfigurationError(
                config.setting("pkcs11LoginPin"),
                f"token {key[0]} is already logged in by another key provider of this process with a "
                "different PIN; give both the same PIN",
            )
        connection.users += 1
        connection.key = key
        return connection

    def detach(self, connection: _Connection) -> None:
        connection.users -= 1
        if connection.users <= 0:
            if self.connections.get(connection.key) is connection:
                del self.connections[connection.key]
            connection.close()


class _Connection:
    """One logged-in session on one token; ``generation`` changes whenever the session is replaced."""

    def __init__(self, library: _Library, config: _Config) -> None:
        self.library = library
        self.config = config  # the first provider's; the PIN is the same for every user of the session
        self.key: tuple[str, int] = ("", 0)
        self.users = 0
        self.generation = 0
        self.token_description = ""
        self._session: Session | None = None

    def session(self) -> Session:
        if self._session is None:
            self.open_session(self.library.find_token(self.config))
        assert self._session is not None
        return self._session

    def open_session(self, token: Token) -> None:
        import pkcs11

        config = self.config
        pin_setting = config.setting("pkcs11LoginPin")
        serial = _serial(token)
        locked = (
            pkcs11.TokenFlag.USER_PIN_LOCKED
            if config.user_type.login == 1
            else pkcs11.TokenFlag.SO_PIN_LOCKED
        )
        if token.flags & locked:
            raise ConfigurationError(pin_setting, _pin_locked(serial))
        rw = config.user_type.login == 0  # a security officer logs in on read/write sessions only
        try:
            session = token.open(
                rw=rw,
                user_pin=config.pin.get_secret_value(),
                user_type=pkcs11.UserType(config.user_type.login),
            )
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            # Something else in this process logged in to this token already; its login serves us.
            session = token.open(rw=rw)
        except pkcs11.exceptions.PinIncorrect:
            raise ConfigurationError(
                pin_setting,
                f"token {serial} refused the PIN for user type '{config.user_type.name}'; each wrong "
                "attempt brings the token closer to locking the PIN",
            ) from None
        except pkcs11.exceptions.PinLocked:
            raise ConfigurationError(pin_setting, _pin_locked(serial)) from None
        except pkcs11.exceptions.PinExpired:
            raise ConfigurationError(
                pin_setting, f"the PIN of token {serial} has expired; set a new one with the token's tools"
            ) from None
        except (pkcs11.exceptions.PinInvalid, pkcs11.exceptions.PinLenRange):
            raise ConfigurationError(
                pin_setting, f"is not a valid PIN for token {serial} (wrong length or characters)"
            ) from None
        except pkcs11.exceptions.UserPinNotInitialized:
            raise ConfigurationError(
                pin_setting, f"token {serial} has no user PIN yet; initialise it with the token's tools"
            ) from None
        except (
            pkcs11.exceptions.AnotherUserAlreadyLoggedIn,
            pkcs11.exceptions.UserTooManyTypes,
            pkcs11.exceptions.SessionReadOnlyExists,
            pkcs11.exceptions.SessionReadWriteSOExists,
        ) as exc:
            raise ConfigurationError(
                config.setting("pkcs11LoginUserType"),
                f"cannot log in to token {serial} as '{config.user_type.name}' while this process holds "
                f"other sessions on it ({_describe(exc)}); use the same user type for every key provider "
                "on one token",
            ) from None
        except pkcs11.PKCS11Error as exc:
            raise _gone(config, f"cannot open a session on token {serial}: {_describe(exc)}") from None
        self._session = session
        self.generation += 1
        self.token_description = f"token {serial} ('{token.label}', {token.manufacturer_id} {token.model})"

    def reset(self) -> None:
        """Close what is left of the session, so that the next use opens and logs in afresh."""
        self.close()
        self.generation += 1

    def close(self) -> None:
        import pkcs11

        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(pkcs11.PKCS11Error):
                session.close()


def _visible_keys(session: Session, config: _Config) -> str:
    """What an operator needs to fix a wrong label or id: the private keys the login can see."""
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    try:
        keys = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
    except pkcs11.PKCS11Error as exc:
        return f"the token did not list its keys ({_describe(exc)})"
    if not keys:
        hint = (
            " (a security officer usually sees none: use the user type 'user')"
            if config.user_type.login == 0
            else ""
        )
        return f"no private key is visible to this login{hint}"
    shown = []
    for key in keys[:20]:
        label = _attribute(key, Attribute.LABEL)
        key_id = _attribute(key, Attribute.ID)
        shown.append(f"'{label or ''}' (id {_id_for_people(key_id)})")
    more = f" and {len(keys) - 20} more" if len(keys) > 20 else ""
    return f"private keys on it: {', '.join(shown)}{more}"


def _id_for_people(key_id: object) -> str:
    """A ``CKA_ID`` as ``pkcs11-tool`` prints it, and as upstream's number when it is one."""
    if not isinstance(key_id, bytes) or not key_id:
        return "-"
    if len(key_id) == 8:
        return f"{key_id.hex()}, upstream's pkcs11PrivateKeyId {int.from_bytes(key_id, 'little')}"
    return key_id.hex()


def _readings_tried(config: _Config) -> str:
    """What the id was read as; for a number, how to write the hex bytes our old docs meant by it."""
    if not config.key_ids:
        return ""
    tried = " or ".join(reading.describe() for reading in config.key_ids)
    first = config.key_ids[0]
    text = config.key_id_text or ""
    if first.form == UPSTREAM_NUMBER:
        digits = text[2:] if text.lower().startswith("0x") else text.lstrip("+")
        return (
            f" (read as {tried}; if the hex bytes {_hex_bytes(digits).hex(' ')} were meant, write "
            f"{setting_name(config.setting('pkcs11PrivateKeyId'))}=hex:{digits.lower()})"
        )
    return f" (read as {tried})"


def _attribute(key: Any, attribute: Any) -> Any:
    import pkcs11

    try:
        return key[attribute]
    except pkcs11.PKCS11Error:
        return None


def _pin_locked(serial: str) -> str:
    return (
        f"the PIN of token {serial} is locked after too many wrong attempts; the token's security "
        "officer must unlock or reset it (e.g. pkcs11-tool --init-pin, or the vendor's tool)"
    )


def _gone(config: _Config, problem: str) -> UnavailableError:
    return UnavailableError(_component(config), problem)


def _component(config: _Config) -> str:
    serial = config.serial or "(the only token)"
    return (
        f"the key provider pkcs11 ({setting_name(config.setting('pkcs11SlotTokenSerialNumber'))}={serial}, "
        f"library {config.library_path})"
    )


_LIBRARIES: dict[str, _Library] = {}
_LIBRARIES_LOCK = threading.Lock()


def _library(path: str) -> _Library:
    with _LIBRARIES_LOCK:
        library = _LIBRARIES.get(path)
        if library is None:
            library = _LIBRARIES[path] = _Library(path)
        return library


# --------------------------------------------------------------------------------------------------
# The provider


class Pkcs11KeyProvider:
    """Wraps locally with the certificate's public key; unwraps on the token, on the library's thread."""

    def __init__(
        self,
        config: _Config,
        library: _Library,
        public_key: rsa.RSAPublicKey,
        certificate: str,
        algorithm: WrapAlgorithm = RSA_OAEP,
    ) -> None:
        self.algorithm = algorithm
        self._config = config
        self._library = library
        self._public_key = public_key
        self._ciphertext_size = (public_key.key_size + 7) // 8
        self._certificate = certificate
        self._connection: _Connection | None = None
        self._key: tuple[int, PrivateKey, bool] | None = None  # (session generation, key, always-auth)
        self._matched: KeyIdReading | None = None  # the reading of pkcs11PrivateKeyId that found the key
        self._found_label: str | None = None
        self._closed = False
        self._description = f"PKCS#11 via {config.library_path}, private key {config.key_selector}"

    @property
    def description(self) -> str:
        return self._description

    def upstream_view(self) -> Pkcs11KeyProvider:
        """The same key pair wrapping as upstream does (``keyconnector.keypairs.base.upstream_view``).
        It shares this provider's session, so only this provider is ever closed."""
        if self.algorithm is RSA_OAEP:
            return self
        view = copy.copy(self)
        view.algorithm = RSA_OAEP
        return view

    @property
    def key_id_match(self) -> str | None:
        """How ``pkcs11PrivateKeyId`` was read to find the key (None when chosen by label), for the log
        and ``check``: an operator taking over must see whether upstream's reading or ours chose it."""
        if self._matched is None:
            return None
        setting = setting_name(self._config.setting("pkcs11PrivateKeyId"))
        return f"{setting}={self._config.key_id_text} matched as {self._matched.describe()}"

    @property
    def label_warning(self) -> str | None:
        """A label that is set but ignored (the id chose the key) and names something else: the
        operator believes one key is in use while another is."""
        config = self._config
        if config.key_id_text is None or config.label is None or config.label == self._found_label:
            return None
        return (
            f"{setting_name(config.setting('pkcs11PrivateKeyLabel'))}='{config.label}' is ignored because "
            f"{setting_name(config.setting('pkcs11PrivateKeyId'))} is set (as upstream does); the key it "
            f"chose is labelled '{self._found_label or ''}': remove the label setting or correct it"
        )

    @property
    def fingerprint(self) -> str:
        # The same key pair and padding as the certificate provider: either can unwrap the other's wraps.
        return self.algorithm.fingerprint(self._public_key)

    async def wrap(self, data_key: bytes) -> bytes:
        return self.algorithm.wrap(self._public_key, data_key)

    async def unwrap(self, wrapped: bytes) -> bytes:
        if len(wrapped) != self._ciphertext_size:
            raise IntegrityFailure(
                f"the stored data key is {len(wrapped)} bytes long instead of {self._ciphertext_size}: it "
                "was wrapped by another key pair"
            )
        return await self._run(functools.partial(self._unwrap_blocking, wrapped), OPERATION_TIMEOUT)

    async def check(self) -> None:
        probe = secrets.token_bytes(32)
        if await self.unwrap(await self.wrap(probe)) != probe:
            raise IntegrityFailure("the token's key does not round-trip a wrapped key")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await self._run(functools.partial(self._library.detach, connection), CLOSE_TIMEOUT)
            except UnavailableError as exc:
                log.warning("closing the PKCS#11 session: %s", exc)

    async def _run(self, call: Callable[[], T], seconds: float) -> T:
        future = asyncio.get_running_loop().run_in_executor(self._library.executor, call)
        try:
            return await asyncio.wait_for(future, seconds)
        except TimeoutError:
            raise UnavailableError(
                _component(self._config), f"the token did not answer within {seconds:g} seconds"
            ) from None

    # ---- on the library's thread

    def open_blocking(self) -> None:
        config = self._config
        self._library.load(config.library_setting)
        self._connection = self._library.attach(config)
        try:
            key, _ = self._current_key()
            self._prove_pair(key)
        except BaseException:
            self._library.detach(self._connection)
            self._connection = None
            raise
        matched = f" = {self._matched.describe()}" if self._matched is not None else ""
        self._description = (
            f"PKCS#11 {self._connection.token_description} via {config.library_path}, private key "
            f"{config.key_selector}{matched}, certificate from {self._certificate}"
        )
        if self.key_id_match is not None:
            log.info("the PKCS#11 private key was found by %s", self.key_id_match)
        if self.label_warning is not None:
            log.warning("%s", self.label_warning)
        if self._closed:  # closed while this was still running (the open timed out)
            self._library.detach(self._connection)
            self._connection = None

    def _current_key(self) -> tuple[PrivateKey, bool]:
        """The private key on the live session, looked up again whenever the session was replaced."""
        connection = self._connection
        if connection is None:
            raise UnavailableError(_component(self._config), "the key provider is closed")
        session = connection.session()
        cached = self._key
        if cached is None or cached[0] != connection.generation:
            key, always_authenticate = self._find_key(session, connection)
            cached = self._key = (connection.generation, key, always_authenticate)
        return cached[1], cached[2]

    def _find_key(self, session: Session, connection: _Connection) -> tuple[PrivateKey, bool]:
        import pkcs11
        from pkcs11 import Attribute, KeyType, ObjectClass

        config = self._config
        token = connection.token_description
        private: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
        found: list[Any] = []
        if config.key_id_text is None:
            found = list(session.get_objects({**private, Attribute.LABEL: config.label}))
        else:
            # By id alone, as upstream: a label left over from another setup must not veto the key.
            for reading in config.key_ids:
                found = list(session.get_objects({**private, Attribute.ID: reading.cka_id}))
                if found:
                    self._matched = reading
                    break
        if not found:
            raise ConfigurationError(
                config.key_setting,
                f"no private key {config.key_selector} on {token}{_readings_tried(config)}; "
                f"{_visible_keys(session, config)}",
            )
        if len(found) > 1:
            what = "CKA_ID" if config.key_id_text is not None else "CKA_LABEL"
            raise ConfigurationError(
                config.key_setting,
                f"{len(found)} private keys {config.key_selector} are on {token}; "
                f"give each key its own {what}",
            )
        key = found[0]
        if key.key_type != KeyType.RSA:
            raise ConfigurationError(
                config.key_setting, f"the private key {config.key_selector} on {token} is not an RSA key"
            )
        label = _attribute(key, Attribute.LABEL)
        self._found_label = label if isinstance(label, str) else None
        try:
            always_authenticate = bool(key[Attribute.ALWAYS_AUTHENTICATE])
        except pkcs11.PKCS11Error:
            always_authenticate = False
        return key, always_authenticate

    def _decrypt(self, wrapped: bytes) -> bytes:
        from pkcs11 import MGF, Mechanism

        key, always_authenticate = self._current_key()
        pin = self._config.pin.get_secret_value() if always_authenticate else None
        hash_name, mgf_name = _MECHANISM_HASHES[self.algorithm.hash_name]
        result = cast("DecryptMixin", key).decrypt(
            wrapped,
            mechanism=Mechanism.RSA_PKCS_OAEP,
            mechanism_param=(Mechanism[hash_name], MGF[mgf_name], None),
            pin=pin,
        )
        assert isinstance(result, bytes)
        return result

    def _prove_pair(self, key: PrivateKey) -> None:
        """At open: the token's key and the certificate must be the two halves of one key pair."""
        import pkcs11
        from pkcs11 import Attribute

        config = self._config
        assert self._connection is not None
        token = self._connection.token_description
        not_a_pair = ConfigurationError(
            config.key_setting,
            f"the certificate from {self._certificate} and the private key {config.key_selector} on "
            f"{token} are not a key pair; point the certificate settings at this key's certificate, or "
            "choose the key that belongs to the certificate",
        )
        modulus: int | None
        try:
            modulus = int.from_bytes(key[Attribute.MODULUS], "big")
        except pkcs11.PKCS11Error:
            modulus = None  # some tokens hide it; the probe below decides alone
        if modulus is not None and modulus != self._public_key.public_numbers().n:
            raise not_a_pair
        probe = secrets.token_bytes(32)
        try:
            answer = self._decrypt(self.algorithm.wrap(self._public_key, probe))
        except pkcs11.PKCS11Error as exc:
            name = type(exc).__name__
            if name in _GONE:
                raise _gone(
                    config, f"the token failed while proving the key pair: {_describe(exc)}"
                ) from None
            if self.algorithm is not RSA_OAEP and name in _UNSUPPORTED_PARAMETERS:
                hash_name = self.algorithm.hash_name
                raise ConfigurationError(
                    config.setting("wrapAlgorithm"),
                    f"{token} refused CKM_RSA_PKCS_OAEP with {hash_name} and MGF1-{hash_name} "
                    f"({_describe(exc)}): it does not support OAEP with {hash_name} (SoftHSM2 2.6 supports "
                    f"SHA-1 only). Keep {RSA_OAEP.name} for this token, or use one that supports it",
                ) from None
            if modulus is None and (name in _BAD_CIPHERTEXT or name in ("GeneralError", "FunctionFailed")):
                raise not_a_pair from None
            raise ConfigurationError(
                config.key_setting,
                f"the token refused to decrypt with the private key {config.key_selector} "
                f"({_describe(exc)}); the key must allow decryption with CKM_RSA_PKCS_OAEP "
                f"({self.algorithm.hash_name}, {setting_name(config.setting('wrapAlgorithm'))})",
            ) from None
        if answer != probe:
            raise not_a_pair

    def _probe_works(self) -> bool:
        import pkcs11

        probe = secrets.token_bytes(32)
        try:
            return self._decrypt(self.algorithm.wrap(self._public_key, probe)) == probe
        except (pkcs11.PKCS11Error, KeyConnectorError):
            return False

    def _unwrap_blocking(self, wrapped: bytes) -> bytes:
        import pkcs11

        connection = self._connection
        if connection is None:
            raise UnavailableError(_component(self._config), "the key provider is closed")
        failure = ""
        for attempt in (1, 2):
            try:
                return self._decrypt(wrapped)
            except pkcs11.PKCS11Error as exc:
                name = type(exc).__name__
                if name in _BAD_CIPHERTEXT or (name not in _GONE and self._probe_works()):
                    raise IntegrityFailure(
                        "the stored data key does not unwrap with the token's private key: it was wrapped "
                        "by another key pair"
                    ) from None
                failure = _describe(exc)
            except UnavailableError as exc:
                failure = exc.problem
            except ConfigurationError as exc:
                failure = str(exc)  # e.g. the PIN or the key changed on the token while we were running
            if attempt == 1:
                log.warning(
                    "the PKCS#11 session on %s failed (%s); opening a new session",
                    connection.token_description or self._config.library_path,
                    failure,
                )
            connection.reset()
        raise UnavailableError(
            _component(self._config), f"{failure} (also after opening a new session and logging in again)"
        )


async def open(side: SideSettings) -> Pkcs11KeyProvider:
    """Check the settings, load the certificate, log in to the token and prove the key pair, or fail now.

    Proving the pair at open turns a certificate that belongs to another key into a start-up error
    naming the setting, instead of an ``IntegrityFailure`` on the first login.
    """
    rsa_settings = side.require_rsa_key()
    prefix = side.rsa_key_prefix
    if side.certificate is None:
        raise ConfigurationError(
            f"{side.certificate_prefix}.provider",
            "is not set; the pkcs11 key provider takes its public key from it",
        )
    config = _config(rsa_settings, prefix)
    algorithm = wrap_algorithm(rsa_settings.wrap_algorithm, f"{prefix}.wrapAlgorithm")
    require("pkcs11", extra="pkcs11", setting=f"{prefix}.provider", provider=PROVIDER)
    loaded = await load_certificate(side)
    provider = Pkcs11KeyProvider(
        config, _library(config.library_path), loaded.public_key, loaded.description, algorithm
    )
    try:
        await provider._run(provider.open_blocking, OPEN_TIMEOUT)
    except BaseException:
        await provider.aclose()
        raise
    return provider
