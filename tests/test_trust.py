"""One trust store: every outgoing TLS client trusts what ``caCertificatesDirectory`` adds, and the same.

Issue 13: database TLS ignored ``caCertificatesDirectory`` (the folder was hard-coded), and trust
was built four ways that disagreed on the system store. These tests hold both down: a PostgreSQL
behind a private CA is reached with ``SSL Mode=VerifyFull`` and the CA only in the folder (through
libpq for migrations and asyncpg for the pool), and every client's configuration (identity server,
database, AWS, Vault, Azure, Google) is made from one :class:`~keyconnector.runtime.trust.Trust` that holds
the private CA and the system store and certifi alike.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import certifi
import pytest

from keyconnector.auth import TokenValidator
from keyconnector.devtools import DevIssuer
from keyconnector.devtools.tls import TlsFiles, local_tls_files
from keyconnector.errors import ConfigurationError, KeyConnectorError
from keyconnector.runtime.settings import Settings, load_settings, side_of
from keyconnector.runtime.trust import Trust
from tests.support.databases import PostgresServer

ENV = "keyConnectorSettings__"

pytestmark = pytest.mark.anyio


# -- a PostgreSQL that speaks TLS under a private CA ------------------------------------------------------


class TlsPostgresServer(PostgresServer):
    """The private test PostgreSQL with ``ssl=on`` and a server certificate from a throw-away CA."""

    name = "PostgreSQL (TLS)"

    def __init__(self) -> None:
        super().__init__()
        self.tls: TlsFiles = local_tls_files(self.folder, "Key Connector database test CA")
        if self._run_as is not None:  # the server reads its key as the service user
            entry = pwd.getpwnam(self._run_as)
            for path in (self.tls.certificate, self.tls.key, self.tls.ca):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(self.tls.key, 0o600)

    def _command(self) -> list[str]:
        return [
            *super()._command(),
            "-c",
            "ssl=on",
            "-c",
            f"ssl_cert_file={self.tls.certificate}",
            "-c",
            f"ssl_key_file={self.tls.key}",
        ]


@pytest.fixture(scope="module")
def tls_postgresql() -> Iterator[TlsPostgresServer]:
    server = TlsPostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


def _database_settings(server: TlsPostgresServer, ca_folder: Path) -> Settings:
    """Settings as an operator gives them: verify-full, no root certificate in the connection string,
    the private CA only in ``caCertificatesDirectory``."""
    database = server.create_database()
    environ = {
        ENV + "database__provider": "postgresql",
        ENV + "database__postgreSqlConnectionString": server.connection_string(
            database, ";SSL Mode=VerifyFull"
        ),
        ENV + "caCertificatesDirectory": str(ca_folder),
    }
    return load_settings(environ).settings


def _folder_with(tmp_path: Path, *certificates: Path) -> Path:
    folder = tmp_path / "ca-certificates"
    folder.mkdir()
    for certificate in certificates:
        shutil.copy(certificate, folder / certificate.name)
    return folder


def test_database_migration_honours_the_ca_folder(tls_postgresql: TlsPostgresServer, tmp_path: Path) -> None:
    """libpq (migrations, ``check``): the folder's CA is trusted, as for every other connection."""
    from keyconnector.runtime.server import migrate_with_retries

    settings = _database_settings(tls_postgresql, _folder_with(tmp_path, tls_postgresql.tls.ca))
    migrate_with_retries(settings, attempts=1)  # fails before issue 13: the folder was ignored


def test_database_without_the_ca_is_a_certificate_error(
    tls_postgresql: TlsPostgresServer, tmp_path: Path
) -> None:
    from keyconnector.runtime.server import migrate_with_retries

    empty = tmp_path / "empty"
    empty.mkdir()
    settings = _database_settings(tls_postgresql, empty)
    with pytest.raises(KeyConnectorError, match="certificate") as raised:
        migrate_with_retries(settings, attempts=1)
    assert "certificate verify failed" in str(raised.value)


async def test_database_pool_honours_the_ca_folder(tls_postgresql: TlsPostgresServer, tmp_path: Path) -> None:
    """asyncpg (the request path) gets the same trust, from the settings that name the folder."""
    from keyconnector.storage.registry import migrate, open_repository

    settings = _database_settings(tls_postgresql, _folder_with(tmp_path, tls_postgresql.tls.ca))
    trust = Trust.from_settings(settings)
    await asyncio.to_thread(migrate, settings.database, trust=trust)
    repository = await open_repository(settings.database, trust=trust)
    try:
        await repository.ping()
        assert await repository.get_wrapped_data_key() is None
    finally:
        await repository.aclose()

    without = Trust.from_directory(tmp_path / "missing")
    repository = await open_repository(settings.database, trust=without)
    try:
        with pytest.raises(KeyConnectorError, match="certificate"):
            await repository.ping()
    finally:
        await repository.aclose()


# -- every consumer gets the same trust ----------------------------------------------------------------------


def _subjects(pem: bytes) -> set[bytes]:
    """Every certificate of a PEM bundle, as DER: what a client built from it trusts (compared as
    DER, not parsed: some roots in system stores are ones newer parsers frown upon)."""
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
    return {ssl.PEM_cert_to_DER_cert(block.decode("ascii")) for block in blocks}


def _reference_subjects() -> set[bytes]:
    """Public roots every client must trust too: certifi's and, where there is one, the system's."""
    subjects = _subjects(Path(certifi.where()).read_bytes())
    system = ssl.get_default_verify_paths().cafile
    if system and os.path.isfile(system):
        subjects |= _subjects(Path(system).read_bytes())
    return subjects


@pytest.fixture
def company_ca(tmp_path: Path) -> tuple[TlsFiles, Path]:
    tls = local_tls_files(tmp_path, "Company private CA " + uuid.uuid4().hex[:8])
    folder = tmp_path / "ca-certificates"
    folder.mkdir()
    shutil.copy(tls.ca, folder / "company.crt")
    return tls, folder


def _settings(folder: Path, **extra: str) -> Settings:
    environ = {ENV + "caCertificatesDirectory": str(folder), **{ENV + k: v for k, v in extra.items()}}
    return load_settings(environ).settings


def test_every_client_gets_the_same_trust(company_ca: tuple[TlsFiles, Path]) -> None:
    from keyconnector._azure import Vault
    from keyconnector.keypairs import awskms, gcpkms, vaulttransit
    from keyconnector.storage.registry import server_target
    from keyconnector.storage.sql.common import client_ssl_context

    tls, folder = company_ca
    settings = _settings(
        folder,
        database__provider="postgresql",
        database__postgreSqlConnectionString="Host=db.example.com;Database=kc;SSL Mode=VerifyFull",
        rsaKey__provider="azurekv",
        rsaKey__azureKeyvaultUri="https://company.vault.azure.net/",
        rsaKey__azureKeyvaultKeyName="kc",
    )
    trust = Trust.from_settings(settings)
    assert trust is Trust.from_directory(folder), "built once: every caller shares one Trust"
    company = ssl.PEM_cert_to_DER_cert(tls.ca.read_text())
    expected = _reference_subjects() | {company}

    # The forms the Trust offers hold the same set: the union, nothing less.
    assert _subjects(trust.bundle_bytes()) == expected
    assert _subjects(Path(trust.bundle_file()).read_bytes()) == expected
    assert set(trust.ssl_context().get_ca_certs(binary_form=True)) == expected

    # Each consumer, configured from the settings, gets that Trust.
    rsa = settings.rsa_key
    assert rsa is not None
    side = side_of(settings)
    bundles = {
        "aws": awskms.verify_argument(side, rsa),
        "vault transit": vaulttransit.verify_argument(side, rsa),
        "azure key vault": Vault(rsa, "rsaKey", settings.ca_certificates_directory, "key provider").options[
            "connection_verify"
        ],
    }
    for name, bundle in bundles.items():
        assert _subjects(Path(bundle).read_bytes()) == expected, name
    assert _subjects(gcpkms.root_certificates(side, rsa)) == expected

    target = server_target(settings.database, trust=trust)
    assert target is not None and target.trust is trust
    assert Path(target.trust.bundle_file()).read_bytes() == trust.bundle_bytes()  # libpq, FreeTDS
    database_context = client_ssl_context(target)
    assert database_context is not None and database_context.check_hostname
    assert set(database_context.get_ca_certs(binary_form=True)) == expected  # asyncpg, aiomysql


def test_a_provider_bundle_setting_still_wins(company_ca: tuple[TlsFiles, Path], tmp_path: Path) -> None:
    tls, folder = company_ca
    trust = Trust.from_directory(folder)
    assert trust.bundle_file(str(tls.ca), "rsaKey.awsCaBundle") == str(tls.ca)
    assert trust.bundle_bytes(str(tls.ca), "rsaKey.awsCaBundle") == tls.ca.read_bytes()
    with pytest.raises(ConfigurationError, match=r"awsCaBundle.*does not exist"):
        trust.bundle_file(str(tmp_path / "nope.pem"), "rsaKey.awsCaBundle")


def test_unreadable_files_in_the_folder_are_skipped(company_ca: tuple[TlsFiles, Path]) -> None:
    """One broken file must not cost the service the other CAs (nor the public roots)."""
    _, folder = company_ca
    (folder / "broken.crt").write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n"
    )
    (folder / "notes.pem").write_text("no certificate here\n")
    trust = Trust.from_directory(folder)
    assert trust.folder_files == (str(folder / "company.crt"),)
    assert trust.ssl_context().get_ca_certs()


async def test_identity_server_trusts_the_folder(tmp_path: Path) -> None:
    """A real HTTPS identity server under a private CA: trusted through the folder, and only then."""
    with DevIssuer(tls=True) as dev:
        folder = tmp_path / "ca-certificates"
        folder.mkdir()
        shutil.copy(dev.ca_file, folder / "identity.crt")
        # As the service builds its validator (keyconnector.http.app.build_services).
        trusted = TokenValidator(dev.url, verify=Trust.from_settings(_settings(folder)))
        untrusted = TokenValidator(dev.url, verify=Trust.from_settings(_settings(tmp_path / "none")))
        try:
            await trusted.refresh()
            with pytest.raises(KeyConnectorError, match="certificate"):
                await untrusted.refresh()
        finally:
            await trusted.aclose()
            await untrusted.aclose()
