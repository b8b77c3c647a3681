"""`keyconnector stats`: the figures match what the test wrote, on every backend, and it only reads."""

from __future__ import annotations

import json
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keyconnector.core.envelope import DataKey
from keyconnector.core.keyring import RETIRED, KeyRing, RingVersion, save_ring
from keyconnector.keypairs import open_key_provider
from keyconnector.runtime.settings import load_settings, side_of
from keyconnector.storage.base import UserKeyRecord
from keyconnector.storage.registry import migrate, open_repository
from tests.conftest import Pfx
from tests.support.backends import run
from tests.support.envelopes import upstream_seal, upstream_wrap
from tests.test_transfer import Deployment, command_env, deployment, keyconnector

AGES: dict[str, timedelta | None] = {
    "never": None,
    "24h": timedelta(hours=1),
    "7d": timedelta(days=3),
    "30d": timedelta(days=20),
    "90d": timedelta(days=60),
    "1y": timedelta(days=200),
    "older": timedelta(days=400),
}


def write_deployment(source: Deployment, *, rotated: bool) -> dict[str, Any]:
    """Rows of every kind, and the figures `stats` must report for them."""
    settings = load_settings(source.env()).settings
    migrate(settings.database)
    now = datetime.now(UTC).replace(tzinfo=None)
    counts = {"1": 0, "2": 0, "unknown": 0}
    buckets = dict.fromkeys(AGES, 0)
    records: list[UserKeyRecord] = []
    version1, version2 = secrets.token_bytes(32), secrets.token_bytes(32)
    sealer = DataKey(version2, 2)
    for i in range(700):
        user = uuid.uuid4()
        bucket = list(AGES)[i % len(AGES)]
        age = AGES[bucket]
        buckets[bucket] += 1
        accessed = None if age is None else now - age
        if i % 10 == 9:
            key = None
        elif i % 10 == 8:
            key, counts["unknown"] = "kc:7:1:AAAA", counts["unknown"] + 1
        elif rotated and i % 3 == 0:
            key, counts["2"] = sealer.seal(secrets.token_bytes(32), user), counts["2"] + 1
        else:
            key, counts["1"] = upstream_seal(version1, secrets.token_bytes(32)), counts["1"] + 1
        records.append(UserKeyRecord(user, key, now - timedelta(days=500), None, accessed))

    async def body() -> str:
        repository = await open_repository(settings.database)
        provider = await open_key_provider(side_of(settings))
        try:
            await repository.store_wrapped_data_key(upstream_wrap(source.pfx, version1))
            if rotated:
                ring = KeyRing(
                    revision=0,
                    current=2,
                    versions={
                        1: RingVersion(1, wraps={provider.fingerprint: upstream_wrap(source.pfx, version1)}),
                        2: RingVersion(
                            2,
                            created="2026-11-01T00:00:00Z",
                            wraps={
                                provider.fingerprint: upstream_wrap(source.pfx, version2),
                                "rsa-oaep-sha1:another-key-pair": "AAAA",
                            },
                        ),
                        3: RingVersion(3, state=RETIRED),
                    },
                )
                ring.auth_key = secrets.token_bytes(32)  # as keyconnector authenticates its rings
                ring.seal_versions({1: DataKey(version1, 1), 2: DataKey(version2, 2)})
                await save_ring(repository, ring)
            await repository.upsert_records(records)
            return provider.fingerprint
        finally:
            await provider.aclose()
            await repository.aclose()

    fingerprint = run(body())
    return {
        "users": len(records),
        "without_key": sum(1 for record in records if record.key is None),
        "records_per_version": {name: count for name, count in counts.items() if count},
        "last_access": buckets,
        "fingerprint": fingerprint,
    }


def snapshot(source: Deployment) -> Any:
    """Everything stored, to show that `stats` changed nothing."""
    if source.backend.name == "json":
        return (source.backend.folder / "data.json").read_bytes()
    return [
        source.backend.sql(f'SELECT * FROM "{table}" ORDER BY 1')
        for table in ("UserKeys", "ApplicationDatas", "keyconnector_key_ring")
    ]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "json", "mariadb"])
def test_figures_match_what_was_written(
    kind: str, pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = deployment(kind, pfx, tmp_path, request)
    wanted = write_deployment(source, rotated=True)
    before = snapshot(source)

    result = keyconnector("stats", "--json", env=command_env(source))
    assert result.returncode == 0, result.stderr
    assert snapshot(source) == before
    stats = json.loads(result.stdout)
    assert stats["users"] == wanted["users"]
    assert stats["without_key"] == wanted["without_key"]
    assert stats["with_key"] == wanted["users"] - wanted["without_key"]
    assert stats["records_per_version"] == wanted["records_per_version"]
    assert stats["last_access"] == wanted["last_access"]
    assert (stats["key_ring_stored"], stats["current_version"], stats["application_datas_wrap"]) == (
        True,
        2,
        True,
    )
    versions = {entry["version"]: entry for entry in stats["versions"]}
    assert (versions[1]["state"], versions[1]["current"], versions[1]["key_pairs"]) == ("active", False, 1)
    assert (versions[2]["state"], versions[2]["current"], versions[2]["key_pairs"]) == ("active", True, 2)
    assert versions[2]["fingerprints"] == sorted([wanted["fingerprint"], "rsa-oaep-sha1:another-key-pair"])
    assert versions[2]["created"] == "2026-11-01T00:00:00Z"
    assert (versions[3]["state"], versions[3]["key_pairs"]) == ("retired", 0)
    assert kind.replace("mariadb", "mysql") in stats["database"]
    assert pfx.password not in result.stdout + result.stderr


def test_the_tables_for_people_and_a_deployment_that_never_rotated(
    pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = deployment("sqlite", pfx, tmp_path, request)
    wanted = write_deployment(source, rotated=False)
    result = keyconnector("stats", env=command_env(source))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "never rotated" in out
    assert "ApplicationDatas holds a wrapped data key" in out
    for label, count in (
        ("rows in UserKeys", wanted["users"]),
        ("without a key", wanted["without_key"]),
        ("unknown format", wanted["records_per_version"]["unknown"]),
        ("more than 1 year ago", wanted["last_access"]["older"]),
        ("within 24 hours", wanted["last_access"]["24h"]),
    ):
        line = next(line for line in out.splitlines() if label in line)
        assert f"{count:,}" in line.split(), line
    assert f"{wanted['records_per_version']['1']:,}" in next(
        line.split() for line in out.splitlines() if line.strip().startswith("1 ")
    )


def test_it_only_reads_and_never_creates_a_database(
    pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    for kind in ("sqlite", "json"):
        missing = deployment(kind, pfx, tmp_path / kind, request)
        result = keyconnector("stats", env=command_env(missing))
        assert result.returncode == 1, result.stderr
        assert "no Key Connector data" in result.stderr
        assert list((tmp_path / kind).iterdir()) == []

    empty = deployment("postgresql", pfx, tmp_path / "postgresql", request)
    result = keyconnector("stats", "--json", env=command_env(empty))
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout) == {  # the failure document of every command's --json
        "ok": False,
        "exit_code": 1,
        "error": result.stderr.strip().removeprefix("keyconnector: "),
    }
    assert (
        empty.backend.sql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        == []
    )
