"""What ``serve`` and ``check`` say when the key pair is the wrong file, is missing, or is not the one
that wrapped the database's data key (issue 16, "Messages that mislead today").

Each case runs the real commands as processes: ``serve`` must refuse with exit 2 and one line, and
``check`` must print a ``FAIL`` line with the same words. The words checked are the ones an operator
acts on: what the file is, which setting to change, and the remedy that fits the situation. A new
key pair is advice only for a new deployment: once the database holds a data key, only the key pair
that wrapped it can open it, so the message must say to restore that one.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, pkcs12

from keyconnector.core.keyring import ForeignDataKey, load_key_set
from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.keypairs import open_key_provider
from keyconnector.keypairs.base import rsa_fingerprint
from keyconnector.keypairs.generate import self_signed_certificate, self_signed_pfx
from keyconnector.runtime.settings import load_settings, side_of
from keyconnector.storage.registry import open_repository
from tests.conftest import Pfx, Service, base_env
from tests.support.envelopes import upstream_seal, upstream_wrap
from tests.support.upstream import Row, build_sqlite

FILE_SETTING = "keyConnectorSettings__certificate__filesystemPath"
PASSWORD_SETTING = "keyConnectorSettings__certificate__filesystemPassword"


def run_command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyconnector", *args], env=env, capture_output=True, text=True, timeout=90
    )


def serve_refuses(env: dict[str, str]) -> str:
    """``serve`` exits 2 before listening, with exactly one ``keyconnector:`` line and no traceback."""
    done = run_command(env, "serve", "--port", str(free_port()))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("keyconnector:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def check_fails(env: dict[str, str], part: str) -> str:
    """``check`` exits 1 with a ``FAIL <part>:`` line; that line."""
    done = run_command(env, "check")
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith(f"FAIL {part}:")]
    assert len(lines) == 1, done.stdout
    return lines[0]


def database_with_a_data_key(path: Path, wrapped_by: Pfx) -> None:
    """An upstream SQLite database with one user record and its data key wrapped by ``wrapped_by``."""
    data_key = secrets.token_bytes(32)
    row = Row(
        str(uuid.uuid4()).upper(), upstream_seal(data_key, secrets.token_bytes(32)), "2024-01-01 00:00:00"
    )
    build_sqlite(path, [row], upstream_wrap(wrapped_by, data_key))


def fingerprint(pfx: Pfx) -> str:
    key, _, _ = pkcs12.load_key_and_certificates(pfx.path.read_bytes(), pfx.password.encode())
    assert isinstance(key, rsa.RSAPrivateKey)
    return rsa_fingerprint(key.public_key(), "rsa-oaep-sha1")


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def foreign_pfx(tmp_path_factory: pytest.TempPathFactory) -> Pfx:
    path = tmp_path_factory.mktemp("foreign") / "foreign.pfx"
    path.write_bytes(self_signed_pfx("foreign-password", bits=2048))
    return Pfx(path, "foreign-password")


# -- 1. what the file is, and what to do --------------------------------------------------------------


def key_file(kind: str, key: rsa.RSAPrivateKey, pfx: Pfx) -> bytes:
    certificate = self_signed_certificate(key, common_name="Key Connector", days=30)
    return {
        "pem certificate and key": certificate.public_bytes(Encoding.PEM)
        + key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
        "pem certificate only": certificate.public_bytes(Encoding.PEM),
        "der certificate": certificate.public_bytes(Encoding.DER),
        "garbage": b"these are not the bytes of a key pair\n",
        "pfx with a wrong password": pfx.path.read_bytes(),
    }[kind]


BAD_FILES = [
    # (kind, setting the line must name, what the file is said to be, what to do)
    ("pem certificate only", FILE_SETTING, "(PEM certificate) carries no private key", "a PFX holding it"),
    ("der certificate", FILE_SETTING, "(DER certificate) carries no private key", "a PFX holding it"),
    ("garbage", FILE_SETTING, "is neither a PFX (PKCS#12) nor a PEM or DER certificate", "keyconnector init"),
    ("pfx with a wrong password", PASSWORD_SETTING, "the password is wrong", "set it to the password"),
]


@pytest.mark.parametrize(
    ("kind", "setting", "what", "remedy"), BAD_FILES, ids=[case[0] for case in BAD_FILES]
)
def test_a_key_pair_file_that_cannot_serve_is_named_for_what_it_is_by_serve_and_check(
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    key: rsa.RSAPrivateKey,
    kind: str,
    setting: str,
    what: str,
    remedy: str,
) -> None:
    path = tmp_path / "key.file"
    path.write_bytes(key_file(kind, key, pfx))
    path.chmod(0o600)
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__certificate__filesystemPath"] = str(path)
    if kind == "pfx with a wrong password":
        env[PASSWORD_SETTING] = "not-the-password"

    for line in (serve_refuses(env), check_fails(env, "key pair")):
        assert setting in line and str(path) in line, line
        assert what in line and remedy in line, line
        if kind != "pfx with a wrong password":
            assert "password" not in line, line  # the password is not what is wrong


def test_a_pem_certificate_with_its_key_serves_and_checks(
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    key: rsa.RSAPrivateKey,
    start_service: Callable[..., Service],
) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(key_file("pem certificate and key", key, pfx))
    path.chmod(0o600)
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__certificate__filesystemPath"] = str(path)
    done = run_command(env, "check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ok   key pair: certificate ({path} (PEM certificate and private key))" in done.stdout
    with start_service(env).client() as client:
        assert client.get("/health/ready").status_code == 200


# -- 2. a missing key pair: restore it, or make one, by what the database holds ----------------------------


def test_a_missing_pfx_for_a_new_deployment_says_to_make_one(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env[FILE_SETTING] = str(tmp_path / "missing.pfx")
    for line in (serve_refuses(env), check_fails(env, "key pair")):
        assert FILE_SETTING in line and f"no PFX file at {tmp_path / 'missing.pfx'}" in line, line
        assert "keyconnector init" in line and "restore" not in line, line
    assert not (tmp_path / "kc.db").exists()  # nothing made while refusing


@pytest.mark.parametrize("how", ["missing", "garbage"])
def test_a_missing_or_unreadable_pfx_over_a_data_key_says_to_restore_it_not_to_make_one(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, foreign_pfx: Pfx, how: str
) -> None:
    database = tmp_path / "kc.db"
    database_with_a_data_key(database, foreign_pfx)
    database.chmod(0o600)
    path = tmp_path / "key.pfx"
    if how == "garbage":
        path.write_bytes(b"\x00" * 64)
        path.chmod(0o600)
    env = base_env(issuer, pfx, database)
    env[FILE_SETTING] = str(path)
    for line in (serve_refuses(env), check_fails(env, "key pair")):
        assert FILE_SETTING in line and str(path) in line, line
        assert "restore the PFX" in line and "from a backup" in line, line
        assert "a new key pair can never open" in line, line
        assert "keyconnector init" not in line, line


# -- 3. a data key this key pair does not open: which setting, which pairs, what to do ------------------


def test_a_foreign_data_key_names_the_key_pair_setting_the_fingerprint_and_the_remedy(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, foreign_pfx: Pfx
) -> None:
    database = tmp_path / "kc.db"
    database_with_a_data_key(database, foreign_pfx)
    database.chmod(0o600)
    env = base_env(issuer, pfx, database)
    for line in (serve_refuses(env), check_fails(env, "data key")):
        assert FILE_SETTING in line, line  # the setting that chose this key pair, not rsaKey__provider
        assert fingerprint(pfx) in line, line
        assert "restore it" in line and "rotate-key-pair" in line, line
        assert "keyconnector init" not in line, line


def test_a_foreign_ring_names_both_fingerprints_and_the_remedy(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, foreign_pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    """A database an earlier keyconnector ran with another key pair: its ring names that pair."""
    database = tmp_path / "kc.db"
    database_with_a_data_key(database, foreign_pfx)
    database.chmod(0o600)
    start_service(base_env(issuer, foreign_pfx, database)).stop()
    line = serve_refuses(base_env(issuer, pfx, database))
    assert FILE_SETTING in line and fingerprint(pfx) in line and fingerprint(foreign_pfx) in line, line
    assert "rotate-key-pair" in line, line


def test_a_worker_loading_a_foreign_data_key_is_told_the_remedy_too(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, foreign_pfx: Pfx
) -> None:
    """A worker (or ``stats``) loads the data keys through the core, past the composition that names
    the setting: the core's own words must still say what to do, not only that it does not unwrap.
    Real parts: the upstream SQLite database and the PFX key provider, as ``serve`` opens them."""
    database = tmp_path / "kc.db"
    database_with_a_data_key(database, foreign_pfx)
    side = side_of(load_settings(base_env(issuer, pfx, database)).settings)

    async def load() -> str:
        provider = await open_key_provider(side)
        repository = await open_repository(side.require_database(), trust=side.trust())
        try:
            with pytest.raises(ForeignDataKey) as caught:
                await load_key_set(repository, provider)
            return str(caught.value)
        finally:
            await repository.aclose()
            await provider.aclose()

    message = asyncio.run(load())
    assert fingerprint(pfx) in message, message
    assert "only the key pair that wrapped it opens it" in message and "restore it from a backup" in message
