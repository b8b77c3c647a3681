"""The key ring against a database writer who does not hold the key pair's private half.

Each test is an attack as an outsider would run it: plain SQL on the real database (SQLite and
PostgreSQL) and the certificate's public key, against a running `keyconnector serve`. Before the
ring was authenticated, each of them worked: a planted data key sealed every new record, a deleted
ring brought retired version 1 back from ApplicationDatas, and a pre-upgrade record copied into
another user's row was served to that user.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyconnector.cli import main
from keyconnector.core.envelope import DataKey
from keyconnector.core.keyring import KeyRing, RingVersion
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.storage.base import StoredKeyRing
from tests.conftest import Pfx, Service
from tests.support.backends import Backend, make_backend
from tests.support.envelopes import b64, upstream_seal, upstream_wrap
from tests.test_rotate import Deployment, deployment, run, seed
from tests.test_user_binding import INTEGRITY_STATUS, data_key, enrol, get, overwrite, stored

DATABASES = ["sqlite", "postgresql"]


def ring_row(backend: Backend) -> tuple[int, str] | None:
    rows = backend.sql("SELECT revision, document FROM keyconnector_key_ring")
    return None if not rows else (int(rows[0][0]), str(rows[0][1]))


def write_ring_row(backend: Backend, revision: int, document: str) -> None:
    """What the attacker does to the ring: plain SQL."""
    if ring_row(backend) is None:
        backend.sql(
            "INSERT INTO keyconnector_key_ring (id, revision, document) VALUES (1, ?, ?)",
            (revision, document),
        )
    else:
        backend.sql("UPDATE keyconnector_key_ring SET revision = ?, document = ?", (revision, document))


def planted_ring(backend: Backend, pfx: Pfx, planted: bytes) -> tuple[int, str]:
    """The strongest forgery the public key allows: a new version 2 holding ``planted`` (wrapped with
    the certificate's public key, as any wrap is made), made current, sealed and MACed with an
    authentication key of the attacker's own (they cannot open the real one)."""
    row = ring_row(backend)
    assert row is not None
    revision, document = row
    ring = KeyRing.parse(StoredKeyRing(revision, document))
    fingerprint = next(iter(ring.versions[1].wraps))
    number = max(ring.versions) + 1
    ring.versions[number] = RingVersion(number, wraps={fingerprint: upstream_wrap(pfx, planted)})
    ring.current = number
    ring.auth_key = secrets.token_bytes(32)
    ring.seal_versions({number: DataKey(planted, number)})
    for entry in ring.versions.values():
        if entry.state == "active" and entry.version != number:
            entry.seal = DataKey(planted, entry.version).seal_secret(ring.auth_key, b"forged")
    return revision + 1, ring.dump(revision + 1)


REFUSALS = ("does not authenticate", "does not carry the key ring's authentication")
"""How a forged ring is refused: by a process that trusted the ring before (its MAC does not verify
under the known key), or cold (the MAC verifies only under the forger's key, which the real versions
do not carry)."""


def refused(text: str) -> bool:
    return any(reason in text for reason in REFUSALS)


def wait_for(condition: Any, timeout: float = 10.0, what: str = "the condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def readiness(service: Service) -> tuple[int, dict[str, Any]]:
    response = httpx.get(service.url + "/health/ready", timeout=5)
    return response.status_code, response.json()


def refusals(service: Service) -> float:
    text = httpx.get(service.url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("keyconnector_key_ring_refusals_total "):
            return float(line.split()[1])
    return 0.0


def cli_output(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def opens_with(key: bytes, record: str, user: uuid.UUID, version: int) -> bool:
    """Whether ``record`` (format 2) decrypts under ``key`` for ``user`` at ``version``."""
    import base64

    blob = base64.b64decode(record.split(":", 3)[3])
    aad = b"keyconnector/record/2|" + user.bytes + version.to_bytes(4, "big")
    try:
        AESGCM(key).decrypt(blob[:12], blob[12:], aad)
    except InvalidTag:
        return False
    return True


def site_for(
    name: str, tmp_path: Path, request: pytest.FixtureRequest, issuer: DevIssuer, pfx: Pfx
) -> Deployment:
    backend = make_backend(name, tmp_path, request)
    return deployment(backend, issuer, pfx, "site", metrics__enabled="true")


@pytest.mark.parametrize("name", DATABASES)
def test_a_data_key_planted_with_the_public_key_is_refused(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    start_service: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site = site_for(name, tmp_path, request, issuer, pfx)
    backend = site.backend
    service: Service = start_service(site.env)
    alice, bob, carol = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    alice_key, bob_key, carol_key = (secrets.token_bytes(32) for _ in range(3))
    with service.client() as client:
        enrol(client, issuer, alice, alice_key)
        legit = ring_row(backend)
        assert legit is not None

        planted = secrets.token_bytes(32)
        write_ring_row(backend, *planted_ring(backend, pfx, planted))
        status, body = wait_for(
            lambda: (lambda r: r if r[1]["checks"].get("keyRing", "ok") != "ok" else None)(
                readiness(service)
            ),
            what="/health/ready reporting the refused ring",
        )
        assert status == 200 and body["status"] == "degraded", body
        assert "does not authenticate" in body["checks"]["keyRing"], body

        # New records are sealed with the last trusted version, never with the planted key.
        enrol(client, issuer, bob, bob_key)
        record = stored(backend, bob)
        assert record.startswith("kc:2:1:"), record
        assert not opens_with(planted, record, bob, 1)
        assert get(client, issuer, bob).json() == {"key": b64(bob_key)}
        assert get(client, issuer, alice).json() == {"key": b64(alice_key)}
    assert wait_for(lambda: refusals(service) >= 1, what="the refusal counted in /metrics")
    assert "REFUSED the stored key ring" in service.logs()

    # The operator's tools say so too, and a routine rotation does not build on the planted version.
    code, out = cli_output(capsys, "check", "--config", str(site.config))
    assert code == 1 and "FAIL key ring" in out and refused(out), out
    code, out = cli_output(capsys, "stats", "--json", "--config", str(site.config))
    stats, _ = json.JSONDecoder().raw_decode(out[out.index("{") :])
    assert code == 0 and stats["key_ring_authentication"].startswith("refused"), out
    forged = ring_row(backend)
    code, out = cli_output(capsys, "rotate-data-key", "--config", str(site.config), "--settle-seconds", "0")
    assert code != 0 and refused(out), out
    assert ring_row(backend) == forged
    assert stored(backend, alice).startswith("kc:2:1:")

    # A process starting cold trusts nothing in the planted ring: 503, and readiness says why.
    service.stop()
    cold: Service = start_service(site.env, ready=False)
    with cold.client() as client:
        response = get(client, issuer, alice)
        assert response.status_code == 503, response.text
        assert (
            client.put(
                "/user-keys",
                headers={"Authorization": f"Bearer {issuer.mint(carol)}"},
                json={"key": b64(carol_key)},
            ).status_code
            == 503
        )
        status, body = readiness(cold)
        assert status == 503 and refused(json.dumps(body)), body
        # The legitimate ring put back: the service recovers by itself.
        write_ring_row(backend, *legit)
        wait_for(lambda: get(client, issuer, alice).status_code == 200, timeout=20, what="recovery")
        assert get(client, issuer, alice).json() == {"key": b64(alice_key)}


@pytest.mark.parametrize("name", DATABASES)
def test_a_deleted_or_rolled_back_ring_does_not_bring_version_1_back(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    start_service: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site = site_for(name, tmp_path, request, issuer, pfx)
    backend = site.backend
    keys = run(seed(site.settings, 30))  # an upstream deployment: version 1 in ApplicationDatas
    version1 = data_key(backend, pfx)
    service: Service = start_service(site.env)
    before_rotation = ring_row(backend)
    assert before_rotation is not None  # adopted at start
    code, out = cli_output(capsys, "rotate-data-key", "--config", str(site.config), "--settle-seconds", "0")
    assert code == 0, out
    after_rotation = ring_row(backend)
    assert after_rotation is not None
    document = json.loads(after_rotation[1])
    tombstone = document["versions"]["1"]
    assert tombstone["state"] == "retired" and tombstone["wraps"] == {} and "seal" not in tombstone
    assert document["current"] == 2 and data_key(backend, pfx) == version1  # ApplicationDatas kept

    users = list(keys)
    newcomer, newcomer_key = uuid.uuid4(), secrets.token_bytes(32)
    with service.client() as client:
        wait_for(lambda: get(client, issuer, users[0]).status_code == 200, what="the service after rotation")

        # 1. The ring deleted: the running service keeps sealing with version 2 and says what happened.
        backend.sql("DELETE FROM keyconnector_key_ring")
        wait_for(
            lambda: "deleted" in readiness(service)[1]["checks"].get("keyRing", ""),
            what="the deleted ring reported",
        )
        enrol(client, issuer, newcomer, newcomer_key)
        assert stored(backend, newcomer).startswith("kc:2:2:")
        assert get(client, issuer, users[1]).json() == {"key": b64(keys[users[1]])}

        # 2. The tombstone turned back into version 1 from ApplicationDatas: refused too.
        resurrected = json.loads(after_rotation[1])
        resurrected["versions"]["1"] = {
            "state": "active",
            "created": "",
            "wraps": {
                next(iter(document["versions"]["2"]["wraps"])): backend.sql(
                    'SELECT "SymmetricKey" FROM "ApplicationDatas"'
                )[0][0]
            },
        }
        resurrected["current"] = 1
        write_ring_row(backend, after_rotation[0], json.dumps(resurrected))
        later, later_key = uuid.uuid4(), secrets.token_bytes(32)
        time.sleep(1.5)
        enrol(client, issuer, later, later_key)
        assert stored(backend, later).startswith("kc:2:2:")
    assert "REFUSED the stored key ring" in service.logs()

    # 3. Cold starts: without a ring, and with the older ring copied back in (its own revision, so
    # the row is consistent), the records of version 2 show the ring lost a version. Nothing is
    # sealed with version 1, and nothing is served until the real ring is back.
    service.stop()
    for revision, text in ((None, None), before_rotation):
        if revision is None:
            backend.sql("DELETE FROM keyconnector_key_ring")
        else:
            assert text is not None
            write_ring_row(backend, revision, text)
        cold: Service = start_service(site.env, ready=False)
        with cold.client() as client:
            assert get(client, issuer, users[2]).status_code == 503
            status, body = readiness(cold)
            assert status == 503 and "version 2" in json.dumps(body), body
        cold.stop()
        assert "sealed by data key version 2 exist" in cold.logs()
    code, out = cli_output(capsys, "check", "--config", str(site.config))
    assert code == 1 and "sealed by data key version 2 exist" in out, out
    assert all(
        not record.startswith("kc:2:1:") for record in map(lambda u: stored(backend, u), [*users, newcomer])
    )

    write_ring_row(backend, *after_rotation)
    restored: Service = start_service(site.env)
    with restored.client() as client:
        for user in [*users[:5], newcomer]:
            expected = newcomer_key if user == newcomer else keys[user]
            assert get(client, issuer, user).json() == {"key": b64(expected)}


@pytest.mark.parametrize("name", DATABASES)
def test_a_pre_upgrade_record_replayed_after_upgrade_records_is_refused(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    start_service: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site = site_for(name, tmp_path, request, issuer, pfx)
    backend = site.backend
    audit_file = tmp_path / "audit.jsonl"
    site.env["keyConnectorSettings__audit__file"] = str(audit_file)
    keys = run(seed(site.settings, 3))
    alice, bob, _ = list(keys)
    dump = {user: stored(backend, user) for user in keys}  # a dump taken before the upgrade
    assert all(not record.startswith("kc:") for record in dump.values())
    service: Service = start_service(site.env)
    with service.client() as client:
        # Before the upgrade, upstream's weakness: Bob's record in Alice's row hands Alice Bob's key.
        overwrite(backend, alice, dump[bob])
        assert get(client, issuer, alice).json() == {"key": b64(keys[bob])}
        overwrite(backend, alice, dump[alice])

        code, out = cli_output(capsys, "upgrade-records", "--config", str(site.config))
        assert code == 0 and "now refuses upstream-format records" in out, out
        assert json.loads(ring_row(backend)[1])["unboundRecords"] == "refused"  # type: ignore[index]

        # The same replay after the upgrade: no key, an integrity failure, audited.
        overwrite(backend, alice, dump[bob])
        response = wait_for(
            lambda: (lambda r: r if r.status_code == INTEGRITY_STATUS else None)(get(client, issuer, alice)),
            what="the replayed record refused",
        )
        assert b64(keys[bob]) not in response.text and b64(keys[alice]) not in response.text
        # Alice's own old (unbound) record is refused just the same: only bound records are served.
        overwrite(backend, alice, dump[alice])
        assert get(client, issuer, alice).status_code == INTEGRITY_STATUS
        assert get(client, issuer, bob).json() == {"key": b64(keys[bob])}
    service.stop()
    entries = [json.loads(line) for line in audit_file.read_text().splitlines() if line.strip()]
    assert any(e.get("user") == str(alice) and e.get("outcome") == "integrity" for e in entries), entries
    assert f"the stored record of user {alice} failed its integrity check" in service.logs()

    # A restart (cold start) keeps refusing them: the flag is in the authenticated ring.
    again: Service = start_service(site.env)
    with again.client() as client:
        assert get(client, issuer, alice).status_code == INTEGRITY_STATUS
    # Flipping the flag back in the table is an edit of the authenticated ring: refused.
    revision, text = ring_row(backend)  # type: ignore[misc]
    edited = json.loads(text)
    edited["unboundRecords"] = "accepted"
    write_ring_row(backend, revision, json.dumps(edited))
    with again.client() as client:
        time.sleep(1.5)
        assert get(client, issuer, alice).status_code == INTEGRITY_STATUS
        wait_for(
            lambda: "does not authenticate" in readiness(again)[1]["checks"]["keyRing"],
            what="the edited ring reported",
        )


@pytest.mark.parametrize("name", DATABASES)
def test_a_new_database_refuses_unbound_records_from_the_start(
    name: str, request: pytest.FixtureRequest, tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Any
) -> None:
    site = site_for(name, tmp_path, request, issuer, pfx)
    backend = site.backend
    service: Service = start_service(site.env)
    alice, key = uuid.uuid4(), secrets.token_bytes(32)
    with service.client() as client:
        enrol(client, issuer, alice, key)
        assert json.loads(ring_row(backend)[1])["unboundRecords"] == "refused"  # type: ignore[index]
        # An upstream-format record under the real data key, written straight into the row.
        overwrite(backend, alice, upstream_seal(data_key(backend, pfx), key))
        assert get(client, issuer, alice).status_code == INTEGRITY_STATUS


def test_two_instances_pick_up_a_legitimate_rotation(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    start_service: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site = site_for("postgresql", tmp_path, request, issuer, pfx)
    backend = site.backend
    first: Service = start_service(site.env)
    second: Service = start_service(site.env)
    code, out = cli_output(capsys, "rotate-data-key", "--config", str(site.config), "--settle-seconds", "0")
    assert code == 0, out
    deadline = time.monotonic() + 1.5 * 0.5 + 2  # the refresh interval (0.5 s in these tests) and a margin
    for service in (first, second):
        user, key = uuid.uuid4(), secrets.token_bytes(32)
        with service.client() as client:
            while True:
                enrol(client, issuer, user, key)
                if stored(backend, user).startswith("kc:2:2:"):
                    break
                assert time.monotonic() < deadline, "an instance did not pick up the new version in time"
                user = uuid.uuid4()
                time.sleep(0.1)
            assert readiness(service)[1]["checks"]["keyRing"] == "ok"
    for service in (first, second):
        assert "REFUSED" not in service.logs()


def test_write_legacy_format_makes_the_ring_accept_unbound_records_and_says_so(
    request: pytest.FixtureRequest, tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Any
) -> None:
    site = site_for("sqlite", tmp_path, request, issuer, pfx)
    backend = site.backend
    first: Service = start_service(site.env)
    first.stop()
    assert json.loads(ring_row(backend)[1])["unboundRecords"] == "refused"  # type: ignore[index]
    legacy: Service = start_service({**site.env, "keyConnectorSettings__compat__writeLegacyFormat": "true"})
    assert json.loads(ring_row(backend)[1])["unboundRecords"] == "accepted"  # type: ignore[index]
    assert "the key ring accepts upstream-format (unbound) records again" in legacy.logs()
    alice, key = uuid.uuid4(), secrets.token_bytes(32)
    with legacy.client() as client:
        enrol(client, issuer, alice, key)
        assert not stored(backend, alice).startswith("kc:")  # upstream's format, for the way back
        assert get(client, issuer, alice).json() == {"key": b64(key)}
