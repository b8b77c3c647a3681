"""An openCryptoki soft token for the tests: the PKCS#11 implementation that does RSA-OAEP with SHA-256.

SoftHSM2 2.6 (Debian's) refuses ``CKM_RSA_PKCS_OAEP`` with any hash but SHA-1, so the ``pkcs11`` key
pair's ``RSA-OAEP-256`` could only be tested for its start-up error there. openCryptoki's soft token
(Debian's ``opencryptoki`` package, which ``make test`` installs) does OAEP with SHA-256 and
MGF1-SHA-256, so it is the token those tests run against.

openCryptoki 3.8 has no private mode: its paths are compiled in (the slot daemon ``pkcsslotd`` reads
/etc/opencryptoki/opencryptoki.conf, listens on /var/run/pkcsslotd.socket, and the soft token keeps
its objects in /var/lib/opencryptoki/swtok) and its directories belong to root and the ``pkcs11``
group. So the fixture needs root, and skips with that reason otherwise. It never touches an
openCryptoki someone else uses: if the daemon runs or the soft token is initialised and the marker
file of these tests is not there, it skips and says so. Otherwise it starts the daemon, initialises
the soft token (slot 3 in the packaged configuration) with fresh PINs, and on teardown stops the
daemon and removes every file the token wrote, leaving the machine as it found it. A run that died
half-way leaves the marker, so the next run takes the leftovers back and cleans them.

pytest-xdist workers share the one daemon and token: a lock file and a list of users in the
session's shared temporary directory decide who starts it and who stops it.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.providers import ProviderEnv
from tests.support.softhsm import PREFIX, certificate_pfx

LIBRARY = "/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so"
SLOTD = "/usr/sbin/pkcsslotd"
PKCSCONF = "/usr/sbin/pkcsconf"
SOFT_TOKEN = Path("/var/lib/opencryptoki/swtok")
PID_FILE = Path("/var/run/pkcsslotd.pid")
SOCKET = Path("/var/run/pkcsslotd.socket")
SLOT = "3"  # the soft token's slot in Debian's /etc/opencryptoki/opencryptoki.conf
DEFAULT_SO_PIN = "87654321"  # what an uninitialised soft token accepts
MARKER = SOFT_TOKEN / ".keyconnector-tests"
LABEL = "kc-tests"
SHA256 = {PREFIX + "wrapAlgorithm": "RSA-OAEP-256"}
LOCKS = (
    Path("/var/lock/opencryptoki/LCK..APIlock"),
    Path("/var/lock/opencryptoki/swtok/LCK..swtok"),
    Path("/var/lock/opencryptoki/tpm/root"),  # the TPM token's per-user lock, made even with no TPM
)
"""Lock files the library and the tokens make; removed at the end if they were not there."""

IMPORT_KEY = """
import os, sys
import pkcs11
from pkcs11 import Attribute
from pkcs11.util.rsa import decode_rsa_private_key
token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])
attributes = decode_rsa_private_key(sys.stdin.buffer.read())
attributes.update({
    Attribute.LABEL: sys.argv[3], Attribute.ID: bytes.fromhex(sys.argv[4]), Attribute.TOKEN: True,
    Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
    Attribute.DECRYPT: True, Attribute.UNWRAP: True,
})
with token.open(rw=True, user_pin=os.environ["KC_TEST_PIN"]) as session:
    session.create_object(attributes)
"""
"""Run in a child process, so that this process loads the library only through the provider."""


@dataclass(frozen=True)
class OckToken:
    serial: str
    pin: str


def _unavailable() -> str | None:
    """Why the openCryptoki soft token cannot be used here (not root), or None; a missing package is a
    failure, as for SoftHSM2, since ``make test`` installs it."""
    if not (Path(LIBRARY).is_file() and Path(SLOTD).is_file() and Path(PKCSCONF).is_file()):
        raise RuntimeError(
            f"openCryptoki is missing ({LIBRARY}, {SLOTD}, {PKCSCONF}); run `make test`, which installs "
            "Debian's opencryptoki package"
        )
    if os.geteuid() != 0:
        return (
            "openCryptoki 3.8's slot daemon and soft token use fixed root-owned paths "
            "(/var/run, /var/lib/opencryptoki): these tests need root"
        )
    return None


def _daemon_pid() -> int | None:
    try:
        pid = int(PID_FILE.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None
    try:
        comm = Path(f"/proc/{pid}/comm").read_text(encoding="ascii").strip()
    except OSError:
        return None
    return pid if comm == "pkcsslotd" else None


def _remove_shared_memory() -> None:
    """Remove the daemon's System V shared memory segment (key ``ftok(pkcsslotd, 'b')``). The daemon
    removes it on exit only when no process has it attached, and a test process that unwrapped
    in-process still does; once removed, the kernel frees it when that process exits."""
    info = os.stat(SLOTD)
    key = (ord("b") << 24) | ((info.st_dev & 0xFF) << 16) | (info.st_ino & 0xFFFF)
    for line in Path("/proc/sysvipc/shm").read_text(encoding="ascii").splitlines()[1:]:
        fields = line.split()
        if int(fields[0]) == key:
            subprocess.run(["ipcrm", "-m", fields[1]], check=True, timeout=60)


def _stop_and_clean() -> None:
    """Stop the daemon these tests started and remove what the soft token wrote."""
    pid = _daemon_pid()
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    for path in (PID_FILE, SOCKET):
        path.unlink(missing_ok=True)
    _remove_shared_memory()
    for entry in SOFT_TOKEN.iterdir():
        if entry.name == "TOK_OBJ":
            for item in entry.iterdir():
                item.unlink()
        elif entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _pkcsconf(*args: str, stdin: str = "") -> None:
    result = subprocess.run([PKCSCONF, *args], input=stdin, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        # The arguments hold PINs: show the output and the option only.
        raise RuntimeError(f"pkcsconf {args[0]} failed: {result.stdout}{result.stderr}")


def _start() -> OckToken:
    """Start the daemon and initialise the soft token with fresh PINs (4 to 8 characters)."""
    if MARKER.exists():
        _stop_and_clean()  # a run that died: its leftovers are ours
    elif _daemon_pid() is not None or (SOFT_TOKEN / "NVTOK.DAT").exists():
        pytest.skip(
            "openCryptoki is in use on this machine (pkcsslotd running or the soft token in "
            f"{SOFT_TOKEN} initialised): the tests leave it alone"
        )
    MARKER.touch()
    try:
        subprocess.run([SLOTD], check=True, timeout=60)  # it forks into the background
        deadline = time.monotonic() + 10
        while not SOCKET.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"pkcsslotd started but {SOCKET} did not appear within 10 s")
            time.sleep(0.05)
        so_pin, pin = secrets.token_hex(4), secrets.token_hex(4)
        _pkcsconf("-I", "-c", SLOT, "-S", DEFAULT_SO_PIN, stdin=LABEL + "\n")
        _pkcsconf("-P", "-c", SLOT, "-S", DEFAULT_SO_PIN, "-n", so_pin)
        _pkcsconf("-u", "-c", SLOT, "-S", so_pin, "-n", pin)
    except BaseException:
        _stop_and_clean()
        raise
    return OckToken(serial="123", pin=pin)  # the soft token's fixed serial number


@contextmanager
def _shared(folder: Path) -> Iterator[OckToken]:
    """The one daemon and token, shared by every pytest-xdist worker of the session."""
    lock, state = folder / "opencryptoki.lock", folder / "opencryptoki.json"
    me = os.getpid()

    @contextmanager
    def locked() -> Iterator[None]:
        with lock.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    with locked():
        if state.exists():
            doc = json.loads(state.read_text(encoding="ascii"))
            token = OckToken(serial=doc["serial"], pin=doc["pin"])
        else:
            locks = [str(path) for path in LOCKS if not path.exists()]
            token, doc = _start(), {"users": [], "new_locks": locks}
            doc.update(serial=token.serial, pin=token.pin)
        doc["users"].append(me)
        state.write_text(json.dumps(doc), encoding="ascii")
    try:
        yield token
    finally:
        with locked():
            doc = json.loads(state.read_text(encoding="ascii"))
            doc["users"].remove(me)
            if doc["users"]:
                state.write_text(json.dumps(doc), encoding="ascii")
            else:
                state.unlink()
                _stop_and_clean()
                for name in doc["new_locks"]:
                    path = Path(name)
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def opencryptoki(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OckToken]:
    reason = _unavailable()
    if reason is not None:
        pytest.skip(reason)
    base = tmp_path_factory.getbasetemp()
    # Under pytest-xdist each worker has its own base directory inside the session's.
    with _shared(base.parent if hasattr(request.config, "workerinput") else base) as token:
        yield token


def import_key(token: OckToken, folder: Path) -> tuple[dict[str, str], tuple[str, ...]]:
    """A fresh RSA-2048 key pair on the soft token, and the settings that name it by label."""
    label, key_id = "kc-" + secrets.token_hex(6), secrets.token_hex(4)
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_KEY, LIBRARY, LABEL, label, key_id],
        input=der,
        env={**os.environ, "KC_TEST_PIN": token.pin},
        capture_output=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"importing a key pair into openCryptoki failed: {result.stderr.decode()}")
    password = "kc-pfx-" + secrets.token_urlsafe(12)
    pfx = certificate_pfx(private_key, folder / f"{label}.pfx", password)
    env = {
        PREFIX + "provider": "pkcs11",
        PREFIX + "pkcs11LibraryPath": LIBRARY,
        PREFIX + "pkcs11SlotTokenSerialNumber": token.serial,
        PREFIX + "pkcs11LoginUserType": "user",
        PREFIX + "pkcs11LoginPin": token.pin,
        PREFIX + "pkcs11PrivateKeyLabel": label,
        "keyConnectorSettings__certificate__provider": "filesystem",
        "keyConnectorSettings__certificate__filesystemPath": str(pfx),
        "keyConnectorSettings__certificate__filesystemPassword": password,
    }
    return env, (token.pin, password)


@pytest.fixture
def opencryptoki_provider(opencryptoki: OckToken, tmp_path: Path) -> ProviderEnv:
    """A fresh key pair on the openCryptoki soft token, with the default wrap algorithm (SHA-1)."""
    env, hidden = import_key(opencryptoki, tmp_path)
    return ProviderEnv(env=env, endpoint=None, secrets=hidden)


@pytest.fixture
def opencryptoki_sha256_provider(opencryptoki: OckToken, tmp_path: Path) -> ProviderEnv:
    """The same with ``rsaKey.wrapAlgorithm`` = ``RSA-OAEP-256``: the pkcs11 provider's SHA-256 unwrap
    on a token that does it."""
    env, hidden = import_key(opencryptoki, tmp_path)
    return ProviderEnv(env={**env, **SHA256}, endpoint=None, secrets=hidden)
