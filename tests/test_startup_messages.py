"""Warnings and errors an operator meets when ``serve`` starts or ``check`` runs name the setting to
change and what to do (issue 16, "Messages that mislead today", the review of the rest).

Each case is provoked for real (``keyconnector check`` as a process, a real HTTPS identity server, a
real folder of CA files) and the printed line is checked for the setting's name and the remedy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.keypairs.generate import self_signed_pfx
from tests.conftest import Pfx, base_env

CA_FOLDER = "keyConnectorSettings__caCertificatesDirectory"


def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyconnector", "check"], env=env, capture_output=True, text=True, timeout=90
    )


def test_an_identity_server_with_an_untrusted_certificate_names_the_ca_folder(
    tmp_path: Path, pfx: Pfx
) -> None:
    with DevIssuer(tls=True) as tls_issuer:
        env = base_env(tls_issuer, pfx, tmp_path / "kc.db")
        env[CA_FOLDER] = str(tmp_path / "no-such-folder")
        done = check(env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("FAIL identity server:")]
    assert len(lines) == 1, done.stdout
    assert "TLS certificate not trusted" in lines[0] and CA_FOLDER in lines[0], lines[0]


def test_a_file_in_the_ca_folder_that_is_no_certificate_names_the_setting(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx
) -> None:
    folder = tmp_path / "ca-certificates"
    folder.mkdir()
    (folder / "company.crt").write_text("this is not a certificate\n")
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env[CA_FOLDER] = str(folder)
    done = check(env)
    warnings = [line for line in done.stderr.splitlines() if "company.crt" in line and "WARNING" in line]
    assert warnings, done.stderr
    assert CA_FOLDER in warnings[0] and "not trusted" in warnings[0], warnings[0]


def test_a_key_too_short_names_the_file_setting_and_the_way_to_a_new_one(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx
) -> None:
    short = tmp_path / "short.pfx"
    short.write_bytes(self_signed_pfx("pw", bits=1024))
    short.chmod(0o600)
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__certificate__filesystemPath"] = str(short)
    env["keyConnectorSettings__certificate__filesystemPassword"] = "pw"
    done = check(env)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("FAIL key pair:")]
    assert len(lines) == 1, done.stdout
    assert "keyConnectorSettings__certificate__filesystemPath: the RSA key is 1024 bits" in lines[0], lines[0]
    assert "rotate-key-pair" in lines[0], lines[0]


def test_a_mysql_server_that_is_down_is_not_reported_as_a_tls_decision_without_remedy(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx
) -> None:
    """SslMode=Preferred against a server that does not answer: the warning says what happens until it
    answers and how to insist on TLS, instead of only 'not using TLS'."""
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__database__provider"] = "mysql"
    env["keyConnectorSettings__database__mySqlConnectionString"] = (
        f"Server=127.0.0.1;Port={free_port()};Database=kc;Uid=kc;Pwd=not-a-secret-here;SslMode=Preferred"
    )
    done = check(env)
    assert any(line.startswith("FAIL database:") for line in done.stdout.splitlines()), done.stdout
    warnings = [line for line in done.stderr.splitlines() if "offers TLS" in line]
    assert warnings, done.stderr
    assert "SslMode=Required" in warnings[0] and "mySqlConnectionString" in warnings[0], warnings[0]
