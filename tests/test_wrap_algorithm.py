"""Leaving SHA-1: ``rsaKey.wrapAlgorithm`` = ``RSA-OAEP-256`` for the certificate, pkcs11 and azurekv
key pairs, against real things (a running `keyconnector serve`, SoftHSM2, the Azure Key Vault
stand-in, real databases).

What must hold: the key pair really wraps with OAEP-SHA-256 (a SHA-1 unwrap refuses the wrap);
``ApplicationDatas`` keeps upstream's SHA-1 wrap, so upstream can still read the deployment; an
existing deployment moves with ``rotate-key-pair`` to the same key pair, online, and
``--retire-old`` drops the SHA-1 wrap; a database writer cannot relabel or swap the two wraps
(the key ring's MAC covers the fingerprint, which names the algorithm); ``stats`` and ``check``
say which algorithm each wrap uses.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from keyconnector.cli import main
from keyconnector.core.keyring import read_ring
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.errors import IntegrityFailure
from keyconnector.keypairs import open_key_provider
from keyconnector.runtime.settings import load_settings, side_of
from keyconnector.storage.registry import open_repository
from tests.conftest import Pfx, Service, base_env
from tests.support.envelopes import upstream_open, upstream_unwrap
from tests.support.providers import ProviderEnv
from tests.test_key_ring_attacks import REFUSALS, cli_output, readiness, ring_row, wait_for, write_ring_row
from tests.test_providers_service import bearer, new_key, service_env, stored_data_key
from tests.test_rotate import Load, check_through_service, deployment, read_state, run, seed

SHA1_SCHEME, SHA256_SCHEME = "rsa-oaep-sha1:", "rsa-oaep-sha256:"
SHA256 = {"keyConnectorSettings__rsaKey__wrapAlgorithm": "RSA-OAEP-256"}
PROVIDERS = ["certificate", "pkcs11_provider", "opencryptoki_provider", "azurekv_key_provider"]


def softhsm_supports_oaep_sha256() -> bool:
    """SoftHSM2 2.6 (Debian's) refuses CKM_RSA_PKCS_OAEP with any hash but SHA-1 (CKR_ARGUMENTS_BAD);
    support for the SHA-2 hashes came after it."""
    text = subprocess.run(["softhsm2-util", "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = (int(part) for part in text.strip().split(".")[:2])
    return (major, minor) > (2, 6)


def provider_env(
    name: str, request: pytest.FixtureRequest, issuer: DevIssuer, pfx: Pfx, database: Path
) -> dict[str, str]:
    """A service's settings with a fresh key pair: the session PFX (``certificate``) or a provider
    fixture's."""
    if name == "certificate":
        return base_env(issuer, pfx, database)
    provider: ProviderEnv = request.getfixturevalue(name)
    return service_env(issuer, pfx, database, provider.env)


async def unwrap_with(env: dict[str, str], wrapped: str) -> bytes:
    """``wrapped`` unwrapped by the key pair the settings ``env`` name (in this process)."""
    provider = await open_key_provider(side_of(load_settings(env).settings))
    try:
        return await provider.unwrap(base64.b64decode(wrapped))
    finally:
        await provider.aclose()


def ring_wraps(env: dict[str, str], version: int = 1) -> dict[str, str]:
    async def body() -> dict[str, str]:
        repository = await open_repository(load_settings(env).settings.database)
        try:
            return dict((await read_ring(repository)).versions[version].wraps)
        finally:
            await repository.aclose()

    return run(body())


@pytest.mark.parametrize("name", PROVIDERS)
def test_sha256_wraps_for_each_provider_and_application_datas_stays_sha1(
    name: str,
    request: pytest.FixtureRequest,
    issuer: DevIssuer,
    pfx: Pfx,
    tmp_path: Path,
    start_service: Any,
) -> None:
    database = tmp_path / "kc.db"
    sha1_env = provider_env(name, request, issuer, pfx, database)
    env = {**sha1_env, **SHA256}
    user, key = uuid.uuid4(), new_key()
    if name == "pkcs11_provider" and not softhsm_supports_oaep_sha256():
        # The token says so at start, naming the setting; nothing is written.
        with pytest.raises(RuntimeError, match="exited with 2") as failed:
            start_service(env)
        assert "keyConnectorSettings__rsaKey__wrapAlgorithm" in str(failed.value)
        assert "does not support OAEP with SHA-256" in str(failed.value)
        assert not database.exists() or database.stat().st_size == 0 or stored_data_key(database) is None
        return

    first: Service = start_service(env)
    with first.client() as client:
        assert client.post("/user-keys", json={"key": key}, headers=bearer(issuer, user)).status_code == 200
        assert client.get("/user-keys", headers=bearer(issuer, user)).json() == {"key": key}
    first.stop()

    # The ring holds this key pair's SHA-256 wrap alone; ApplicationDatas is upstream's SHA-1 wrap of
    # the same data key.
    wraps = ring_wraps(env)
    assert [fp.partition(":")[0] for fp in wraps] == ["rsa-oaep-sha256"], wraps
    sha256 = next(iter(wraps.values()))
    application_datas = stored_data_key(database)
    assert application_datas is not None
    data_key = run(unwrap_with(env, sha256))
    assert run(unwrap_with(sha1_env, application_datas)) == data_key
    if name == "certificate":
        assert upstream_unwrap(pfx, application_datas) == data_key  # upstream's own algorithm
    # The SHA-256 wrap is really OAEP-SHA-256: the same key pair with SHA-1 refuses it.
    with pytest.raises(IntegrityFailure):
        run(unwrap_with(sha1_env, sha256))

    second: Service = start_service(env)
    with second.client() as client:
        assert client.get("/user-keys", headers=bearer(issuer, user)).json() == {"key": key}
    second.stop()
    assert "ApplicationDatas keeps upstream's RSA-OAEP (SHA-1) wrap" in second.logs()
    assert stored_data_key(database) == application_datas

    check = subprocess.run(
        [sys.executable, "-m", "keyconnector", "check"], env=env, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "wrap algorithm: this key pair wraps with RSA-OAEP-256 (SHA-256)" in check.stdout, check.stdout
    assert "ApplicationDatas keeps version 1 wrapped with upstream's RSA-OAEP (SHA-1)" in check.stdout


def test_a_wrong_wrap_algorithm_is_a_setting_error_with_a_suggestion(
    issuer: DevIssuer, pfx: Pfx, tmp_path: Path
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__rsaKey__wrapAlgorithm"] = "RSA-OAEP256"
    check = subprocess.run(
        [sys.executable, "-m", "keyconnector", "check"], env=env, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 1, check.stdout + check.stderr
    assert "keyConnectorSettings__rsaKey__wrapAlgorithm" in check.stdout
    assert "did you mean 'RSA-OAEP-256'?" in check.stdout, check.stdout


def key_pair_settings(name: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """``deployment``'s extra settings for a key pair: none for the session PFX (``certificate``), the
    provider fixture's ``keyConnectorSettings__*`` settings otherwise."""
    if name == "certificate":
        return {}
    provider: ProviderEnv = request.getfixturevalue(name)
    prefix = "keyConnectorSettings__"
    return {k.removeprefix(prefix): v for k, v in provider.env.items() if k.startswith(prefix)}


@pytest.mark.parametrize("name", ["certificate", "opencryptoki_provider"])
def test_rotate_the_same_key_pair_to_sha256_online_then_retire_sha1(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    start_service: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The move off SHA-1 with the key pair in a file and on a PKCS#11 token (openCryptoki's soft
    token, which unwraps OAEP-SHA-256 on the token)."""
    from tests.support.backends import make_backend

    backend = make_backend("sqlite", tmp_path, request)
    key_pair = key_pair_settings(name, request)
    old = deployment(backend, issuer, pfx, "old", **key_pair)
    new = deployment(backend, issuer, pfx, "new", **key_pair, rsaKey__wrapAlgorithm="RSA-OAEP-256")
    keys = run(seed(old.settings, 300))
    users = list(keys)
    before = run(read_state(old.settings))
    assert before.application_datas is not None

    old_service: Service = start_service(old.env)
    load = Load(old_service.url, issuer, {u: keys[u] for u in users[:50]}, users[50:60])
    load.start()
    try:
        load.wait_for(20)
        code, out = cli_output(
            capsys, "rotate-key-pair", "--config", str(old.config), "--target-config", str(new.config)
        )
        assert code == 0 and f"now also wrapped by {SHA256_SCHEME}" in out, out
        rotated = run(read_state(old.settings))
        wraps = rotated.ring.versions[1].wraps
        sha1_fp = next(fp for fp in wraps if fp.startswith(SHA1_SCHEME))
        sha256_fp = next(fp for fp in wraps if fp.startswith(SHA256_SCHEME))
        assert sha1_fp.partition(":")[2] == sha256_fp.partition(":")[2]  # one key pair, two algorithms
        assert wraps[sha1_fp] == before.application_datas
        assert rotated.application_datas == before.application_datas

        # Both wraps are read during the move: the SHA-256 instance serves next to the SHA-1 one.
        new_service: Service = start_service(new.env)
        load.wait_for(load.gets + 20)
        check_through_service(new_service, issuer, {u: keys[u] for u in users[:20]})

        code, out = cli_output(capsys, "stats", "--json", "--config", str(new.config))
        stats, _ = json.JSONDecoder().raw_decode(out[out.index("{") :])
        version_1 = stats["versions"][0]
        assert dict(zip(version_1["fingerprints"], version_1["algorithms"], strict=True)) == {
            sha1_fp: "RSA-OAEP (SHA-1)",
            sha256_fp: "RSA-OAEP-256 (SHA-256)",
        }
        code, out = cli_output(capsys, "stats", "--config", str(new.config))
        assert code == 0 and "algorithm" in out and "(SHA-256)" in out and "(SHA-1)" in out, out
    finally:
        load.stop()
    assert load.errors == [], load.errors[:5]
    old_service.stop()

    written = dict(load.written)
    # Retire the SHA-1 wrap while the SHA-256 instance keeps serving under load.
    load = Load(new_service.url, issuer, {u: keys[u] for u in users[:50]}, users[60:70])
    load.start()
    try:
        load.wait_for(20)
        code, out = cli_output(capsys, "rotate-key-pair", "--config", str(new.config), "--retire-old")
        assert code == 0 and f"removed the wraps of {sha1_fp}" in out, out
        load.wait_for(load.gets + 40)  # past a ring reload (every 0.5 s)
    finally:
        load.stop()
    assert load.errors == [], load.errors[:5]
    assert load.puts > 0

    retired = run(read_state(new.settings))
    assert list(retired.ring.versions[1].wraps) == [sha256_fp]
    # ApplicationDatas stays upstream's SHA-1 wrap: upstream still reads every upstream-format record.
    assert retired.application_datas == before.application_datas
    if name == "certificate":
        data_key = upstream_unwrap(pfx, retired.application_datas or "")
    else:  # upstream's SHA-1 unwrap, done by the token
        data_key = run(unwrap_with(old.env, retired.application_datas or ""))
    for user in users[100:120]:
        assert upstream_open(data_key, retired.records[user] or "") == keys[user]
    code, out = cli_output(capsys, "check", "--config", str(new.config))
    assert "the key ring holds version 1: RSA-OAEP-256 (SHA-256)" in out, out

    # The data key rotates with one algorithm left; the new version is wrapped with SHA-256 only.
    code, out = cli_output(capsys, "rotate-data-key", "--config", str(new.config), "--settle-seconds", "0")
    assert code == 0, out
    final = run(read_state(new.settings))
    assert final.ring.active == [2] and list(final.ring.versions[2].wraps) == [sha256_fp]
    expected = dict(keys) | written | load.written
    assert all(final.keys.open(final.records[u] or "", u) == expected[u] for u in users)


def test_turning_on_sha256_without_rotating_keeps_working_and_says_what_to_run(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    start_service: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An upstream-format deployment adopted with SHA-1, then switched to SHA-256 by setting alone:
    it reads its SHA-1 wraps (never broken by the switch), and check and the log say to rotate."""
    from tests.support.backends import make_backend

    backend = make_backend("sqlite", tmp_path, request)
    old = deployment(backend, issuer, pfx, "old")
    new = deployment(backend, issuer, pfx, "new", rsaKey__wrapAlgorithm="RSA-OAEP-256")
    keys = run(seed(old.settings, 20))
    assert main(["check", "--config", str(old.config)]) == 0
    service: Service = start_service(old.env)  # adopts the ring with SHA-1
    check_through_service(service, issuer, {u: keys[u] for u in list(keys)[:5]})
    service.stop()

    switched: Service = start_service(new.env)
    check_through_service(switched, issuer, keys)
    assert "have no wrap of this key pair's algorithm (rsa-oaep-sha256)" in switched.logs()
    code, out = cli_output(capsys, "check", "--config", str(new.config))
    assert code == 0 and "warn wrap algorithm" in out and "rotate-key-pair" in out, out


def refused(text: str) -> bool:
    """The MAC does not verify, or a wrap filed under this key pair and algorithm does not open."""
    return any(reason in text for reason in (*REFUSALS, "the ring was edited"))


def forged_document(document: str, edit: Any) -> str:
    """The stored ring with ``edit`` applied to version 1's wraps, MAC left as it was."""
    body = json.loads(document)
    body["versions"]["1"]["wraps"] = edit(body["versions"]["1"]["wraps"])
    return json.dumps(body, sort_keys=True)


def relabel_as_sha1(wraps: dict[str, str]) -> dict[str, str]:
    """The SHA-256 wrap filed under the SHA-1 fingerprint, the SHA-1 one dropped: a downgrade."""
    (fp, wrapped), *_ = [(fp, w) for fp, w in wraps.items() if fp.startswith(SHA256_SCHEME)]
    return {fp.replace(SHA256_SCHEME, SHA1_SCHEME): wrapped}


def swap(wraps: dict[str, str]) -> dict[str, str]:
    """Each wrap filed under the other algorithm's fingerprint."""
    items = sorted(wraps.items())
    assert len(items) == 2
    return {items[0][0]: items[1][1], items[1][0]: items[0][1]}


def drop_sha256(wraps: dict[str, str]) -> dict[str, str]:
    """Only the SHA-1 wrap left: what a process configured for SHA-256 would fall back to."""
    return {fp: w for fp, w in wraps.items() if fp.startswith(SHA1_SCHEME)}


@pytest.mark.parametrize("edit", [relabel_as_sha1, swap, drop_sha256])
def test_a_database_writer_cannot_downgrade_the_wrap_algorithm(
    edit: Any,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    start_service: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.support.backends import make_backend

    backend = make_backend("sqlite", tmp_path, request)
    old = deployment(backend, issuer, pfx, "old")
    site = deployment(backend, issuer, pfx, "site", rsaKey__wrapAlgorithm="RSA-OAEP-256")
    run(seed(old.settings, 5))
    # Half-way through the move: the ring holds the key pair's SHA-1 and SHA-256 wraps.
    code, out = cli_output(
        capsys, "rotate-key-pair", "--config", str(old.config), "--target-config", str(site.config)
    )
    assert code == 0, out
    service: Service = start_service(site.env)
    alice, alice_key = uuid.uuid4(), new_key()
    with service.client() as client:
        response = client.put("/user-keys", json={"key": alice_key}, headers=bearer(issuer, alice))
        assert response.status_code == 200, response.text
    legit = ring_row(backend)
    assert legit is not None
    revision, document = legit
    assert len(json.loads(document)["versions"]["1"]["wraps"]) == 2  # SHA-1 and SHA-256

    write_ring_row(backend, revision, forged_document(document, edit))
    # The running service refuses the edited ring (and keeps serving with the one it trusted).
    _, body = wait_for(
        lambda: (lambda r: r if r[1]["checks"].get("keyRing", "ok") != "ok" else None)(readiness(service)),
        what="/health/ready reporting the refused ring",
    )
    assert refused(json.dumps(body)), body
    with service.client() as client:
        assert client.get("/user-keys", headers=bearer(issuer, alice)).json() == {"key": alice_key}
    code, out = cli_output(capsys, "check", "--config", str(site.config))
    assert code == 1 and "FAIL key ring" in out and refused(out), out
    service.stop()

    cold: Service = start_service(site.env, ready=False)
    with cold.client() as client:
        assert client.get("/user-keys", headers=bearer(issuer, alice)).status_code == 503


def test_the_way_back_to_upstream_from_a_sha256_deployment(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    start_service: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """downgrade-records after a data-key rotation re-makes version 1: ApplicationDatas gets it
    wrapped with upstream's SHA-1 (upstream reads it), the key ring with SHA-256."""
    from tests.support.backends import make_backend
    from tests.test_downgrade import LEGACY, enrol_through_service, upstream_read_all

    backend = make_backend("sqlite", tmp_path, request)
    site = deployment(backend, issuer, pfx, "site", rsaKey__wrapAlgorithm="RSA-OAEP-256")
    legacy = deployment(backend, issuer, pfx, "legacy", rsaKey__wrapAlgorithm="RSA-OAEP-256", **LEGACY)
    service: Service = start_service(site.env)
    keys = enrol_through_service(service, issuer, 9)
    code, out = cli_output(capsys, "rotate-data-key", "--config", str(site.config), "--settle-seconds", "0")
    assert code == 0, out
    code, out = cli_output(
        capsys, "downgrade-records", "--config", str(legacy.config), "--settle-seconds", "0"
    )
    assert code == 0 and "version 1 re-made from version 2's key" in out, out
    assert "ApplicationDatas updated" in out, out

    assert upstream_read_all(backend, pfx) == keys  # upstream's SHA-1 unwrap of ApplicationDatas
    state = run(read_state(site.settings))
    assert (state.ring.current, state.ring.active) == (1, [1])
    assert [fp.partition(":")[0] for fp in state.ring.versions[1].wraps] == ["rsa-oaep-sha256"]
    check_through_service(service, issuer, keys)


def test_azurekv_sha256_unreachable_at_start_gives_503_then_recovers(
    request: pytest.FixtureRequest,
    issuer: DevIssuer,
    pfx: Pfx,
    tmp_path: Path,
    start_service: Any,
) -> None:
    """Key Vault down when serve starts: the SHA-256 provider is connected later, and the first data
    key made then is wrapped as upstream reads it (ApplicationDatas) and with SHA-256 (the ring)."""
    from tests.support.tcpproxy import TcpProxy
    from tests.test_providers_service import wait_for_status

    provider: ProviderEnv = request.getfixturevalue("azurekv_key_provider")
    assert provider.endpoint is not None
    database = tmp_path / "kc.db"
    with TcpProxy(provider.endpoint) as proxy:
        env = {**service_env(issuer, pfx, database, provider.through(proxy.port)), **SHA256}
        service: Service = start_service(env, ready=False)
        user, key = uuid.uuid4(), new_key()
        with service.client() as client:
            refused_post = client.post("/user-keys", json={"key": key}, headers=bearer(issuer, user))
            assert refused_post.status_code == 503, refused_post.text
            proxy.up()
            stored = wait_for_status(
                client, "POST", "/user-keys", 200, json={"key": key}, headers=bearer(issuer, user)
            )
            assert stored.status_code == 200, stored.text
            assert client.get("/user-keys", headers=bearer(issuer, user)).json() == {"key": key}
        wraps = ring_wraps(env)
        assert [fp.partition(":")[0] for fp in wraps] == ["rsa-oaep-sha256"], wraps
        application_datas = stored_data_key(database)
        assert application_datas is not None
        sha1_env = {k: v for k, v in env.items() if k not in SHA256}
        assert run(unwrap_with(sha1_env, application_datas)) == run(unwrap_with(env, *wraps.values()))
