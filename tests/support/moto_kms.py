"""AWS KMS for the tests: moto's server (``moto_server``, from the ``moto[server]`` package in the venv).

moto implements KMS's Encrypt/Decrypt for RSA (OAEP) and symmetric keys, key states, aliases, and one
key store per account (credentials from STS AssumeRole act in the role's account), which is what the
provider's tests need. It keeps its state in memory: a stopped server forgets every key.

The fixtures at the bottom give each test a fresh key on one session-wide server, with settings that
use static test credentials and point boto3's configuration files at empty files, so that neither the
service nor the tests ever read the developer's real AWS configuration.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyconnector.devtools import free_port
from tests.support.processes import read_log, started, stop_process, wait_for_port
from tests.support.providers import ProviderEnv

REGION = "eu-west-1"
TEST_ACCESS_KEY_ID = "AKIAKEYCONNECTORTEST"
TEST_SECRET_ACCESS_KEY = "kc-test-secret-" + secrets.token_urlsafe(24)
"""Random per test session, so that a test finding it in a log or a message is never a coincidence."""


def moto_server_binary() -> str:
    path = Path(sys.executable).with_name("moto_server")
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: moto's server is not installed; run `make test`")
    return str(path)


def isolated_aws_files(folder: Path) -> dict[str, str]:
    """Environment that keeps boto3 away from ~/.aws and the machine's own AWS settings.

    The config file holds an empty ``[default]`` profile and AWS_PROFILE names it, so that a profile
    the developer exported cannot be looked for in these files.
    """
    config = folder / "aws-config"
    credentials = folder / "aws-credentials"
    config.write_text("[default]\n", encoding="ascii")
    credentials.write_text("", encoding="ascii")
    return {
        "AWS_CONFIG_FILE": str(config),
        "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
        "AWS_PROFILE": "default",
        "AWS_DEFAULT_PROFILE": "default",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class MotoServer:
    """One ``moto_server`` process on a free port of 127.0.0.1; ``env`` adds to its environment."""

    def __init__(self, *, env: dict[str, str] | None = None, tls: tuple[Path, Path] | None = None) -> None:
        self.port = free_port()
        self.extra_env = env or {}
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None
        self._clients: dict[tuple[object, ...], Any] = {}
        self.log = Path(tempfile.mkstemp(prefix="moto-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> MotoServer:
        if self.running:
            return self
        command = [moto_server_binary(), "-H", "127.0.0.1", "-p", str(self.port)]
        if self.tls is not None:
            command += ["-c", str(self.tls[0]), "-k", str(self.tls[1])]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(self.extra_env)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        wait_for_port("127.0.0.1", self.port, self.process, what="moto_server", log=self.log, timeout=timeout)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        stop_process(self.process)

    def destroy(self) -> None:
        self.stop()
        self.log.unlink(missing_ok=True)

    def logs(self) -> str:
        return read_log(self.log)

    def client(
        self,
        service: str = "kms",
        *,
        access_key_id: str = TEST_ACCESS_KEY_ID,
        secret_access_key: str = TEST_SECRET_ACCESS_KEY,
        session_token: str | None = None,
        verify: str | bool | None = None,
    ) -> Any:
        """A boto3 client for this server that reads nothing from the environment or ~/.aws (cached:
        making one costs a tenth of a second)."""
        import boto3
        import botocore.session

        cache_key = (service, access_key_id, secret_access_key, session_token, verify)
        if cache_key in self._clients:
            return self._clients[cache_key]
        isolated = botocore.session.Session(
            session_vars={
                "profile": (None, None, None, None),
                "config_file": (None, None, os.devnull, None),
                "credentials_file": (None, None, os.devnull, None),
            }
        )
        client = boto3.session.Session(
            botocore_session=isolated,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            aws_session_token=session_token,
            region_name=REGION,
        ).client(service, endpoint_url=self.url, verify=verify)
        self._clients[cache_key] = client
        return client

    def create_key(self, *, symmetric: bool = False, **kwargs: Any) -> dict[str, Any]:
        """A new ENCRYPT_DECRYPT key (RSA_2048 or SYMMETRIC_DEFAULT); its KeyMetadata."""
        spec = "SYMMETRIC_DEFAULT" if symmetric else "RSA_2048"
        params: dict[str, Any] = {"KeySpec": spec, "KeyUsage": "ENCRYPT_DECRYPT", **kwargs}
        metadata: dict[str, Any] = self.client().create_key(**params)["KeyMetadata"]
        return metadata

    def provider_env(self, key_id: str, *, symmetric: bool, files: dict[str, str]) -> ProviderEnv:
        return kms_provider_env(self.url, key_id, symmetric=symmetric, files=files)


def kms_provider_env(
    endpoint_url: str, key_id: str, *, symmetric: bool, files: dict[str, str]
) -> ProviderEnv:
    """Settings for a KMS endpoint at ``endpoint_url`` (http(s)://127.0.0.1:port), static test credentials."""
    env = {
        "keyConnectorSettings__rsaKey__provider": "awskms",
        "keyConnectorSettings__rsaKey__awsAccessKeyId": TEST_ACCESS_KEY_ID,
        "keyConnectorSettings__rsaKey__awsAccessKeySecret": TEST_SECRET_ACCESS_KEY,
        "keyConnectorSettings__rsaKey__awsRegion": REGION,
        "keyConnectorSettings__rsaKey__awsKeyId": key_id,
        "keyConnectorSettings__rsaKey__awsUseSymmetricEncryption": "true" if symmetric else "false",
        "keyConnectorSettings__rsaKey__awsEndpoint": endpoint_url,
        **files,
    }
    port = int(endpoint_url.rsplit(":", 1)[1].rstrip("/"))
    return ProviderEnv(env=env, endpoint=("127.0.0.1", port), secrets=(TEST_SECRET_ACCESS_KEY,))


# -- pytest fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_kms_server() -> Iterator[MotoServer]:
    yield from started(MotoServer())


@pytest.fixture(scope="session")
def aws_isolated_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return isolated_aws_files(tmp_path_factory.mktemp("aws"))


@pytest.fixture
def awskms_provider(moto_kms_server: MotoServer, aws_isolated_files: dict[str, str]) -> ProviderEnv:
    """A fresh RSA_2048 key (wrapping with RSAES_OAEP_SHA_256) on the session's moto server."""
    moto_kms_server.start()
    key = moto_kms_server.create_key(symmetric=False)
    return moto_kms_server.provider_env(key["KeyId"], symmetric=False, files=aws_isolated_files)


@pytest.fixture
def awskms_symmetric_provider(moto_kms_server: MotoServer, aws_isolated_files: dict[str, str]) -> ProviderEnv:
    """A fresh SYMMETRIC_DEFAULT key (awsUseSymmetricEncryption=true) on the session's moto server."""
    moto_kms_server.start()
    key = moto_kms_server.create_key(symmetric=True)
    return moto_kms_server.provider_env(key["KeyId"], symmetric=True, files=aws_isolated_files)
