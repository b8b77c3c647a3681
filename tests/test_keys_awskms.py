"""The ``awskms`` key provider against moto's KMS server (a real HTTP server on 127.0.0.1).

Besides the session's plain server, a few tests use servers of their own: one that enforces IAM
(credentials and permissions), one behind TLS, one that is stopped. What moto cannot produce
(throttling, a 5xx, IncorrectKeyException) comes from a small scripted HTTP endpoint that answers in
KMS's wire format, and the container and EC2 metadata credential endpoints are local HTTP stand-ins.

Every test runs with the AWS_* environment cleared and boto3's files pointed at empty ones, so nothing
reads the developer's real AWS configuration.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import http.server
import json
import secrets
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keyconnector.devtools import free_port
from keyconnector.devtools.tls import local_tls_files
from keyconnector.errors import ConfigurationError, IntegrityFailure, KeyConnectorError, UnavailableError
from keyconnector.keypairs import KeyProvider, awskms
from keyconnector.runtime.settings import load_settings, side_of
from tests.support.moto_kms import (
    REGION,
    TEST_ACCESS_KEY_ID,
    TEST_SECRET_ACCESS_KEY,
    MotoServer,
    isolated_aws_files,
    kms_provider_env,
)
from tests.support.providers import ProviderEnv, run_and_close

PREFIX = "keyConnectorSettings__rsaKey__"


# -- helpers ----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    import os

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    files = isolated_aws_files(tmp_path)
    for name, value in files.items():
        monkeypatch.setenv(name, value)
    return files


def open_provider(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, *, transfer: bool = False
) -> awskms.AwsKmsKeyProvider:
    """Open the provider as the service would: settings parsed from the environment-style names."""
    for name, value in env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    settings_env = {k: v for k, v in env.items() if k.startswith("keyConnectorSettings")}
    if transfer:
        settings_env = {
            k.replace("keyConnectorSettings__", "keyConnectorSettings__transferTo__"): v
            for k, v in settings_env.items()
        }
    settings = load_settings(environ=settings_env).settings
    return asyncio.run(awskms.open(side_of(settings, transfer=transfer)))


def with_settings(provider: ProviderEnv, **changes: str | None) -> dict[str, str]:
    """The fixture's settings with some rsaKey settings changed (None removes one)."""
    env = dict(provider.env)
    for name, value in changes.items():
        env.pop(PREFIX + name, None)
        if value is not None:
            env[PREFIX + name] = value
    return env


def open_error(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, *, transfer: bool = False
) -> KeyConnectorError:
    with pytest.raises(KeyConnectorError) as caught:
        open_provider(env, monkeypatch, transfer=transfer)
    return caught.value


def assert_no_secret(exc: BaseException, *values: str) -> None:
    """Neither the message nor anything a traceback would print (chained exceptions included)."""
    printed = "".join(traceback.format_exception(exc)) + repr(exc)
    for value in (TEST_SECRET_ACCESS_KEY, *values):
        assert value not in printed


def round_trip(provider: KeyProvider) -> None:
    async def main() -> None:
        data_key = secrets.token_bytes(32)
        wrapped = await provider.wrap(data_key)
        assert wrapped != data_key and data_key not in wrapped
        assert await provider.unwrap(wrapped) == data_key
        await provider.check()
        await provider.aclose()

    asyncio.run(main())


def unwrap(provider: KeyProvider, wrapped: bytes) -> bytes:
    return run_and_close(provider, lambda: provider.unwrap(wrapped))


def wrap(provider: KeyProvider, data_key: bytes) -> bytes:
    return run_and_close(provider, lambda: provider.wrap(data_key))


@dataclass(frozen=True)
class FreshKey:
    symmetric: bool
    metadata: dict[str, Any]
    env: dict[str, str]


@pytest.fixture(params=[False, True], ids=["rsa", "symmetric"])
def fresh_key(
    request: pytest.FixtureRequest, moto_kms_server: MotoServer, aws_isolated_files: dict[str, str]
) -> FreshKey:
    """A new RSA_2048 or SYMMETRIC_DEFAULT key on the session's server, and the settings that use it."""
    symmetric: bool = request.param
    key = moto_kms_server.create_key(symmetric=symmetric)
    env = moto_kms_server.provider_env(key["KeyId"], symmetric=symmetric, files=aws_isolated_files).env
    return FreshKey(symmetric, key, env)


class StandIn:
    """A local HTTP endpoint answering with ``respond(method, path, headers, body)``; records requests."""

    def __init__(
        self, respond: Callable[[str, str, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]
    ):
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.requests.append((self.command, self.path, headers))
                status, extra, payload = respond(self.command, self.path, headers, body)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- round trips and upstream compatibility ---------------------------------------------------------------


def test_rsa_key_round_trips(awskms_provider: ProviderEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = open_provider(awskms_provider.env, monkeypatch)
    assert "RSAES_OAEP_SHA_256" in provider.description
    assert awskms_provider.env[PREFIX + "awsKeyId"] in provider.description
    assert TEST_SECRET_ACCESS_KEY not in provider.description
    round_trip(provider)


def test_symmetric_key_round_trips(
    awskms_symmetric_provider: ProviderEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = open_provider(awskms_symmetric_provider.env, monkeypatch)
    assert "SYMMETRIC_DEFAULT" in provider.description
    round_trip(provider)


def test_compatible_with_upstream_wrapping(
    fresh_key: FreshKey, moto_kms_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upstream calls Encrypt/Decrypt itself: what it wrapped unwraps here, and the other way round."""
    key_id, env = fresh_key.metadata["KeyId"], fresh_key.env
    algorithm = "SYMMETRIC_DEFAULT" if fresh_key.symmetric else "RSAES_OAEP_SHA_256"
    kms = moto_kms_server.client()
    data_key = secrets.token_bytes(32)
    upstream_wrapped = kms.encrypt(KeyId=key_id, Plaintext=data_key, EncryptionAlgorithm=algorithm)[
        "CiphertextBlob"
    ]

    assert unwrap(open_provider(env, monkeypatch), upstream_wrapped) == data_key

    ours = wrap(open_provider(env, monkeypatch), data_key)
    plain = kms.decrypt(CiphertextBlob=ours, KeyId=key_id, EncryptionAlgorithm=algorithm)["Plaintext"]
    assert plain == data_key


@pytest.mark.parametrize("spelling", ["id", "arn", "alias", "alias-arn"])
def test_key_by_id_arn_or_alias(
    spelling: str,
    moto_kms_server: MotoServer,
    aws_isolated_files: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = moto_kms_server.create_key()
    alias = "alias/kc-" + secrets.token_hex(4)
    moto_kms_server.client().create_alias(AliasName=alias, TargetKeyId=key["KeyId"])
    key_id = {
        "id": key["KeyId"],
        "arn": key["Arn"],
        "alias": alias,
        "alias-arn": key["Arn"].split(":key/")[0] + ":" + alias,
    }[spelling]
    by_spelling = moto_kms_server.provider_env(key_id, symmetric=False, files=aws_isolated_files).env
    by_id = moto_kms_server.provider_env(key["KeyId"], symmetric=False, files=aws_isolated_files).env

    provider = open_provider(by_spelling, monkeypatch)
    assert key["Arn"] in provider.description
    data_key = secrets.token_bytes(32)
    assert unwrap(open_provider(by_id, monkeypatch), wrap(provider, data_key)) == data_key


def test_transfer_settings_are_read_under_transfer_to(
    awskms_provider: ProviderEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    round_trip(open_provider(awskms_provider.env, monkeypatch, transfer=True))
    error = open_error(with_settings(awskms_provider, awsRegion=None), monkeypatch, transfer=True)
    assert isinstance(error, ConfigurationError) and error.setting == "transferTo.rsaKey.awsRegion"
    assert "keyConnectorSettings__transferTo__rsaKey__awsRegion" in str(error)


def test_transfer_without_transfer_settings_is_a_configuration_error() -> None:
    settings = load_settings(environ={}).settings
    with pytest.raises(ConfigurationError) as caught:
        asyncio.run(awskms.open(side_of(settings, transfer=True)))
    assert caught.value.setting == "transferTo.rsaKey.provider"


def test_concurrent_wraps_and_unwraps(awskms_provider: ProviderEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = open_provider(awskms_provider.env, monkeypatch)
    data_keys = [secrets.token_bytes(32) for _ in range(24)]

    async def main() -> None:
        try:
            wrapped = await asyncio.gather(*(provider.wrap(k) for k in data_keys))
            unwrapped = await asyncio.gather(*(provider.unwrap(w) for w in reversed(wrapped)))
            assert unwrapped == list(reversed(data_keys))
        finally:
            await provider.aclose()

    asyncio.run(main())


# -- the ciphertext refused -------------------------------------------------------------------------------


def test_altered_or_foreign_ciphertext_is_an_integrity_error(
    fresh_key: FreshKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = fresh_key.env
    wrapped = wrap(open_provider(env, monkeypatch), secrets.token_bytes(32))
    altered = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
    with pytest.raises(IntegrityFailure):
        unwrap(open_provider(env, monkeypatch), altered)
    with pytest.raises(IntegrityFailure):
        unwrap(open_provider(env, monkeypatch), b"")
    with pytest.raises(IntegrityFailure):
        unwrap(open_provider(env, monkeypatch), b"x" * 7000)  # longer than any KMS ciphertext


# -- settings and the key, checked at open ----------------------------------------------------------------


def test_one_static_credential_without_the_other(
    awskms_provider: ProviderEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    error = open_error(with_settings(awskms_provider, awsAccessKeySecret=None), monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsAccessKeySecret"
    error = open_error(with_settings(awskms_provider, awsAccessKeyId=""), monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsAccessKeyId"
    assert "keyConnectorSettings__rsaKey__awsAccessKeyId" in str(error)
    assert_no_secret(error)


def test_missing_settings(awskms_provider: ProviderEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    error = open_error(with_settings(awskms_provider, awsRegion=None), monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsRegion"
    error = open_error(with_settings(awskms_provider, awsKeyId=None), monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsKeyId"
    error = open_error(with_settings(awskms_provider, awsEndpoint="127.0.0.1:4566"), monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsEndpoint"
    error = open_error(with_settings(awskms_provider, awsCaBundle="/nonexistent/ca.pem"), monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsCaBundle"
    error = open_error(with_settings(awskms_provider, awsRegion="not a region!"), monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsRegion"


def test_region_from_the_environment(awskms_provider: ProviderEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", REGION)
    round_trip(open_provider(with_settings(awskms_provider, awsRegion=None), monkeypatch))


def test_unknown_key(awskms_provider: ProviderEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    for key_id in ("alias/does-not-exist", "11111111-2222-3333-4444-555555555555"):
        error = open_error(with_settings(awskms_provider, awsKeyId=key_id), monkeypatch)
        assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsKeyId"
        assert key_id in str(error)
        assert_no_secret(error)


def test_key_in_another_region_is_unknown(
    awskms_provider: ProviderEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    error = open_error(with_settings(awskms_provider, awsRegion="us-west-2"), monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsKeyId"
    assert "us-west-2" in str(error)


def test_disabled_key(
    awskms_provider: ProviderEnv, moto_kms_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    moto_kms_server.client().disable_key(KeyId=awskms_provider.env[PREFIX + "awsKeyId"])
    error = open_error(awskms_provider.env, monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsKeyId"
    assert "disabled" in str(error)


def test_key_pending_deletion(
    awskms_provider: ProviderEnv, moto_kms_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    moto_kms_server.client().schedule_key_deletion(
        KeyId=awskms_provider.env[PREFIX + "awsKeyId"], PendingWindowInDays=7
    )
    error = open_error(awskms_provider.env, monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsKeyId"
    assert "scheduled for deletion" in str(error)


@pytest.mark.parametrize(
    ("spec", "usage"), [("RSA_2048", "SIGN_VERIFY"), ("HMAC_256", "GENERATE_VERIFY_MAC")]
)
def test_key_not_made_for_encryption(
    spec: str,
    usage: str,
    moto_kms_server: MotoServer,
    aws_isolated_files: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = moto_kms_server.client().create_key(KeySpec=spec, KeyUsage=usage)["KeyMetadata"]
    env = moto_kms_server.provider_env(key["KeyId"], symmetric=False, files=aws_isolated_files).env
    error = open_error(env, monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsKeyId"
    assert usage in str(error) and "ENCRYPT_DECRYPT" in str(error)


def test_algorithm_setting_must_fit_the_key(
    awskms_provider: ProviderEnv, awskms_symmetric_provider: ProviderEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    error = open_error(with_settings(awskms_provider, awsUseSymmetricEncryption="true"), monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsUseSymmetricEncryption"
    assert "RSA_2048" in str(error) and "set it to false" in str(error)
    error = open_error(
        with_settings(awskms_symmetric_provider, awsUseSymmetricEncryption="false"), monkeypatch
    )
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsUseSymmetricEncryption"
    assert "SYMMETRIC_DEFAULT" in str(error) and "set it to true" in str(error)


def test_no_credentials_anywhere(awskms_provider: ProviderEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    error = open_error(
        with_settings(awskms_provider, awsAccessKeyId=None, awsAccessKeySecret=None), monkeypatch
    )
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsAccessKeyId"
    assert "default credential chain" in str(error) and "AWS_ACCESS_KEY_ID" in str(error)


def test_partial_credentials_in_the_environment(
    awskms_provider: ProviderEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID)
    error = open_error(
        with_settings(awskms_provider, awsAccessKeyId=None, awsAccessKeySecret=None), monkeypatch
    )
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsAccessKeyId"
    assert "AWS_SECRET_ACCESS_KEY" in str(error)


def test_missing_profile(awskms_provider: ProviderEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    env = with_settings(awskms_provider, awsAccessKeyId=None, awsAccessKeySecret=None)
    env["AWS_PROFILE"] = env["AWS_DEFAULT_PROFILE"] = "no-such-profile"
    error = open_error(env, monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsAccessKeyId"
    assert "no-such-profile" in str(error)


# -- the default credential chain -------------------------------------------------------------------------


class OtherAccount:
    """Temporary credentials of a role in account 111122223333, and a key made in that account.

    moto keeps one key store per account, so the key is found only with these credentials: a test that
    opens it by its bare id proves that the provider used the credentials the chain was given.
    """

    ACCOUNT = "111122223333"

    def __init__(self, server: MotoServer) -> None:
        role = f"arn:aws:iam::{self.ACCOUNT}:role/keyconnector"
        credentials = server.client("sts").assume_role(RoleArn=role, RoleSessionName="kc-test")["Credentials"]
        self.access_key_id: str = credentials["AccessKeyId"]
        self.secret_access_key: str = credentials["SecretAccessKey"]
        self.session_token: str = credentials["SessionToken"]
        kms = server.client(
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
            session_token=self.session_token,
        )
        self.key = kms.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]
        assert self.key["Arn"].split(":")[4] == self.ACCOUNT

    def json(self) -> bytes:
        expiry = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return json.dumps(
            {
                "Code": "Success",
                "Type": "AWS-HMAC",
                "AccessKeyId": self.access_key_id,
                "SecretAccessKey": self.secret_access_key,
                "Token": self.session_token,
                "Expiration": expiry,
            }
        ).encode()


@pytest.fixture
def other_account(moto_kms_server: MotoServer) -> OtherAccount:
    moto_kms_server.start()
    return OtherAccount(moto_kms_server)


@pytest.fixture
def chain_env(
    moto_kms_server: MotoServer, other_account: OtherAccount, isolated_aws: dict[str, str]
) -> dict[str, str]:
    """Static credentials empty: boto3's default chain must find the other account's credentials."""
    env = moto_kms_server.provider_env(other_account.key["KeyId"], symmetric=False, files=isolated_aws).env
    env[PREFIX + "awsAccessKeyId"] = ""
    env[PREFIX + "awsAccessKeySecret"] = ""
    return env


def test_static_credentials_of_another_account_do_not_find_the_key(
    moto_kms_server: MotoServer,
    other_account: OtherAccount,
    isolated_aws: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check that makes the chain tests below meaningful."""
    env = moto_kms_server.provider_env(other_account.key["KeyId"], symmetric=False, files=isolated_aws).env
    error = open_error(env, monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsKeyId"


def test_chain_environment_variables(
    chain_env: dict[str, str], other_account: OtherAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain_env["AWS_ACCESS_KEY_ID"] = other_account.access_key_id
    chain_env["AWS_SECRET_ACCESS_KEY"] = other_account.secret_access_key
    chain_env["AWS_SESSION_TOKEN"] = other_account.session_token
    round_trip(open_provider(chain_env, monkeypatch))


def test_chain_shared_credentials_file_and_profile(
    chain_env: dict[str, str],
    other_account: OtherAccount,
    isolated_aws: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    Path(isolated_aws["AWS_SHARED_CREDENTIALS_FILE"]).write_text(
        "[keyconnector]\n"
        f"aws_access_key_id = {other_account.access_key_id}\n"
        f"aws_secret_access_key = {other_account.secret_access_key}\n"
        f"aws_session_token = {other_account.session_token}\n",
        encoding="ascii",
    )
    # The region comes from the profile too.
    Path(isolated_aws["AWS_CONFIG_FILE"]).write_text(
        f"[profile keyconnector]\nregion = {REGION}\n", encoding="ascii"
    )
    del chain_env[PREFIX + "awsRegion"]
    chain_env["AWS_PROFILE"] = chain_env["AWS_DEFAULT_PROFILE"] = "keyconnector"
    round_trip(open_provider(chain_env, monkeypatch))


def test_chain_container_credentials(
    chain_env: dict[str, str], other_account: OtherAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ECS/EKS: the SDK fetches the task role's credentials from a local endpoint, with a token."""
    token = "container-token-" + secrets.token_hex(8)

    def respond(
        method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if method == "GET" and path == "/v1/credentials" and headers.get("authorization") == token:
            return 200, {"Content-Type": "application/json"}, other_account.json()
        return 401, {}, b""

    with StandIn(respond) as endpoint:
        chain_env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = endpoint.url + "/v1/credentials"
        chain_env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = token
        round_trip(open_provider(chain_env, monkeypatch))
    assert [(m, p) for m, p, _ in endpoint.requests] == [("GET", "/v1/credentials")]


def test_chain_container_endpoint_down_is_unavailable(
    chain_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "container-token-" + secrets.token_hex(8)
    chain_env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = f"http://127.0.0.1:{free_port()}/v1/credentials"
    chain_env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = token
    error = open_error(chain_env, monkeypatch)
    assert isinstance(error, UnavailableError)
    assert "container" in str(error).lower()
    assert_no_secret(error, token)


def test_chain_instance_metadata_v2(
    chain_env: dict[str, str], other_account: OtherAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EC2: IMDSv2, a session token from a PUT, then the role's name and its credentials with that token."""
    imds_token = "imds-token-" + secrets.token_hex(8)
    role = "keyconnector-role"

    def respond(
        method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if method == "PUT" and path == "/latest/api/token":
            if "x-aws-ec2-metadata-token-ttl-seconds" not in headers:
                return 400, {}, b""
            return 200, {}, imds_token.encode()
        if headers.get("x-aws-ec2-metadata-token") != imds_token:
            return 401, {}, b""
        if method == "GET" and path == "/latest/meta-data/iam/security-credentials/":
            return 200, {}, role.encode()
        if method == "GET" and path == f"/latest/meta-data/iam/security-credentials/{role}":
            return 200, {}, other_account.json()
        return 404, {}, b""

    with StandIn(respond) as endpoint:
        chain_env.pop("AWS_EC2_METADATA_DISABLED")
        monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
        chain_env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = endpoint.url + "/"
        round_trip(open_provider(chain_env, monkeypatch))
    calls = [(m, p) for m, p, _ in endpoint.requests]
    assert calls[:3] == [
        ("PUT", "/latest/api/token"),
        ("GET", "/latest/meta-data/iam/security-credentials/"),
        ("GET", f"/latest/meta-data/iam/security-credentials/{role}"),
    ]


# -- credentials and permissions refused (moto enforcing IAM) ---------------------------------------------


class IamServer:
    """A moto server that enforces IAM after the set-up calls below (INITIAL_NO_AUTH_ACTION_COUNT)."""

    SETUP_CALLS = 6

    def __init__(self) -> None:
        self.server = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": str(self.SETUP_CALLS)})

    def start(self) -> IamServer:
        self.server.start()
        iam = self.server.client("iam")
        iam.create_user(UserName="reader")  # 1
        iam.create_user(UserName="nobody")  # 2
        self.reader = iam.create_access_key(UserName="reader")["AccessKey"]  # 3
        self.nobody = iam.create_access_key(UserName="nobody")["AccessKey"]  # 4
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["kms:DescribeKey"], "Resource": "*"}],
        }
        iam.put_user_policy(UserName="reader", PolicyName="describe", PolicyDocument=json.dumps(policy))  # 5
        self.key = self.server.create_key()  # 6: from here on, every call is authenticated
        return self

    def env(
        self, access_key: dict[str, str], files: dict[str, str], *, secret: str | None = None
    ) -> dict[str, str]:
        env = self.server.provider_env(self.key["KeyId"], symmetric=False, files=files).env
        env[PREFIX + "awsAccessKeyId"] = access_key["AccessKeyId"]
        env[PREFIX + "awsAccessKeySecret"] = secret or access_key["SecretAccessKey"]
        return env


@pytest.fixture(scope="module")
def iam_server() -> Iterator[IamServer]:
    server = IamServer()
    try:
        yield server.start()
    finally:
        server.server.destroy()


def test_wrong_secret_access_key(
    iam_server: IamServer, isolated_aws: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "wrong-" + secrets.token_urlsafe(24)
    error = open_error(iam_server.env(iam_server.reader, isolated_aws, secret=wrong), monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsAccessKeySecret"
    assert_no_secret(error, wrong, iam_server.reader["SecretAccessKey"])


def test_unknown_access_key_id(
    iam_server: IamServer, isolated_aws: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    unknown = {"AccessKeyId": "AKIAUNKNOWNKEY000000", "SecretAccessKey": TEST_SECRET_ACCESS_KEY}
    error = open_error(iam_server.env(unknown, isolated_aws), monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsAccessKeyId"
    assert "InvalidClientTokenId" in str(error)
    assert_no_secret(error)


def test_no_permission_to_describe_the_key(
    iam_server: IamServer, isolated_aws: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    error = open_error(iam_server.env(iam_server.nobody, isolated_aws), monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsAccessKeyId"
    assert "kms:DescribeKey" in str(error) and "user/nobody" in str(error)
    assert_no_secret(error, iam_server.nobody["SecretAccessKey"])


def test_no_permission_to_encrypt_is_unavailable_after_open(
    iam_server: IamServer, isolated_aws: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opened fine; a policy that lacks Encrypt/Decrypt is a 503 until the operator fixes it."""
    provider = open_provider(iam_server.env(iam_server.reader, isolated_aws), monkeypatch)
    with pytest.raises(UnavailableError) as caught:
        wrap(provider, secrets.token_bytes(32))
    assert "kms:Encrypt" in str(caught.value)
    assert_no_secret(caught.value, iam_server.reader["SecretAccessKey"])


# -- outages ----------------------------------------------------------------------------------------------


def test_stopped_server_is_unavailable(
    aws_isolated_files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = MotoServer().start()
    try:
        key = server.create_key()
        env = server.provider_env(key["KeyId"], symmetric=False, files=aws_isolated_files).env
        provider = open_provider(env, monkeypatch)
        wrapped = wrap(open_provider(env, monkeypatch), secrets.token_bytes(32))
        server.stop()
        with pytest.raises(UnavailableError) as caught:
            unwrap(provider, wrapped)
        assert "keyConnectorSettings__rsaKey__awsEndpoint" in str(caught.value)
        assert f"127.0.0.1:{server.port}" in str(caught.value)
        assert_no_secret(caught.value)

        error = open_error(env, monkeypatch)
        assert isinstance(error, UnavailableError)
        assert "keyConnectorSettings__rsaKey__awsEndpoint" in str(error) and "refused" in str(error)
    finally:
        server.destroy()


def test_unreachable_endpoint_from_the_environment_names_the_region(
    awskms_provider: ProviderEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no awsEndpoint, the endpoint is the region's (here redirected by AWS_ENDPOINT_URL_KMS)."""
    env = with_settings(awskms_provider, awsEndpoint=None)
    env["AWS_ENDPOINT_URL_KMS"] = f"http://127.0.0.1:{free_port()}"
    error = open_error(env, monkeypatch)
    assert isinstance(error, UnavailableError)
    assert f"AWS KMS in {REGION}" in error.component
    assert "keyConnectorSettings__rsaKey__awsRegion" in error.component


def kms_answer(code: str, status: int) -> tuple[int, dict[str, str], bytes]:
    return (
        status,
        {"Content-Type": "application/x-amz-json-1.1"},
        json.dumps({"__type": code, "message": code}).encode(),
    )


@pytest.mark.parametrize(
    ("code", "status"),
    [("ThrottlingException", 400), ("KMSInternalException", 500), ("ServiceUnavailable", 503)],
)
def test_throttling_and_server_errors_are_unavailable(
    code: str, status: int, aws_isolated_files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with StandIn(lambda *_: kms_answer(code, status)) as endpoint:
        env = kms_provider_env(endpoint.url, "alias/kc", symmetric=False, files=aws_isolated_files).env
        error = open_error(env, monkeypatch)
    assert isinstance(error, UnavailableError)
    assert code in str(error) and "keyConnectorSettings__rsaKey__awsEndpoint" in str(error)
    assert len(endpoint.requests) == awskms.MAX_ATTEMPTS  # one retry, no more


@pytest.mark.parametrize("code", ["IncorrectKeyException", "InvalidCiphertextException"])
def test_ciphertext_refused_is_an_integrity_error(
    code: str, aws_isolated_files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What real KMS answers for a ciphertext of another key (moto answers AccessDeniedException)."""
    arn = f"arn:aws:kms:{REGION}:123456789012:key/11111111-2222-3333-4444-555555555555"
    metadata = {
        "KeyMetadata": {
            "KeyId": arn.rsplit("/", 1)[1],
            "Arn": arn,
            "KeyState": "Enabled",
            "KeyUsage": "ENCRYPT_DECRYPT",
            "KeySpec": "SYMMETRIC_DEFAULT",
        }
    }

    def respond(
        method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if headers.get("x-amz-target") == "TrentService.DescribeKey":
            return 200, {"Content-Type": "application/x-amz-json-1.1"}, json.dumps(metadata).encode()
        return kms_answer(code, 400)

    with StandIn(respond) as endpoint:
        env = kms_provider_env(endpoint.url, arn, symmetric=True, files=aws_isolated_files).env
        provider = open_provider(env, monkeypatch)
        with pytest.raises(IntegrityFailure) as caught:
            unwrap(provider, base64.b64decode("AQIDBAUGBwgJCgsMDQ4PEA=="))
    assert code in str(caught.value) and "another key" in str(caught.value)
    decrypt = [h for _, _, h in endpoint.requests if h.get("x-amz-target") == "TrentService.Decrypt"]
    assert len(decrypt) == 1  # a refused ciphertext is not retried


# -- TLS --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MotoServer, Path]]:
    # A private CA, and a certificate it issued for 127.0.0.1 (what a company's VPC proxy might use).
    tls = local_tls_files(tmp_path_factory.mktemp("tls"), "Test company CA")
    server = MotoServer(tls=(tls.certificate, tls.key))
    try:
        yield server.start(), tls.ca
    finally:
        server.destroy()


def test_tls_endpoint_behind_a_private_ca(
    tls_server: tuple[MotoServer, Path],
    isolated_aws: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, ca = tls_server
    key = server.client(verify=str(ca)).create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")[
        "KeyMetadata"
    ]
    env = server.provider_env(key["KeyId"], symmetric=False, files=isolated_aws).env

    error = open_error(env, monkeypatch)
    assert isinstance(error, ConfigurationError) and error.setting == "rsaKey.awsCaBundle"

    round_trip(open_provider({**env, PREFIX + "awsCaBundle": str(ca)}, monkeypatch))

    company_cas = tmp_path / "ca-certificates"
    company_cas.mkdir()
    (company_cas / "company.crt").write_bytes(ca.read_bytes())
    round_trip(
        open_provider({**env, "keyConnectorSettings__caCertificatesDirectory": str(company_cas)}, monkeypatch)
    )
