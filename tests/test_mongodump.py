"""Leaving upstream's MongoDB: `keyconnector transfer --from-mongo-dump` from real dump files.

No MongoDB server runs here, so the dumps are what `mongodump` and `mongoexport` write, built with
pymongo's own `bson` package in the shapes upstream's .NET driver stored (PROTOCOL section 6):
`ApplicationData {_id: ObjectId, SymmetricKey}` and `UserKey {_id: GUID, Key, CreationDate,
RevisionDate, LastAccessDate}`, GUIDs in binary subtype 3 (.NET legacy byte order) and subtype 4,
records sealed and the data key wrapped by upstream's algorithm written out by hand
(tests/support/envelopes.py). Each transfer runs the real command into a real database, is checked
record by record, and a real `serve` on the result answers the users' keys.
"""

from __future__ import annotations

import base64
import gzip
import json
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import bson
import pytest
from bson import json_util
from bson.binary import Binary, UuidRepresentation
from bson.objectid import ObjectId

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.storage.base import UserKeyRecord
from keyconnector.storage.mongodump import read_mongo_dump
from tests.conftest import Pfx
from tests.support.envelopes import upstream_seal, upstream_wrap
from tests.test_transfer import (
    SETTINGS,
    Deployment,
    Expected,
    assert_target_holds,
    clean_env,
    deployment,
    keyconnector,
)

# -- dumps in the documents' real shapes ---------------------------------------------------------------


@dataclass
class Dump:
    """Upstream's two collections as documents, and what they hold."""

    application_data: list[dict[str, Any]]
    user_key: list[dict[str, Any]]
    expected: Expected
    legacy_user: uuid.UUID
    """A user whose _id is binary subtype 3 (.NET legacy byte order)."""
    standard_user: uuid.UUID
    """A user whose _id is binary subtype 4."""
    keyless_user: uuid.UUID


def make_dump(pfx: Pfx, users: int = 60) -> Dump:
    """Users alternately with subtype 3 and subtype 4 ids, two without a key; millisecond dates
    (what a BSON datetime holds), some revision and access dates null as upstream left them."""
    data_key = secrets.token_bytes(32)
    expected = Expected({}, {})
    documents: list[dict[str, Any]] = []
    for i in range(users):
        user, plaintext = uuid.uuid4(), secrets.token_bytes(32)
        created = datetime(2023, 5, 6, 7, 8, 9) + timedelta(minutes=i, milliseconds=(i * 37) % 1000)
        revised = created + timedelta(days=2, milliseconds=5) if i % 3 == 0 else None
        accessed = created + timedelta(days=9, milliseconds=999) if i % 4 == 0 else None
        key: str | None = upstream_seal(data_key, plaintext)
        if i in (5, 6):
            key, plaintext = None, None  # type: ignore[assignment]
        representation = UuidRepresentation.CSHARP_LEGACY if i % 2 == 0 else UuidRepresentation.STANDARD
        documents.append(
            {
                "_id": Binary.from_uuid(user, representation),
                "Key": key,
                "CreationDate": created,
                "RevisionDate": revised,
                "LastAccessDate": accessed,
            }
        )
        expected.plaintexts[user] = plaintext
        expected.rows[user] = UserKeyRecord(user, key, created, revised, accessed)
    users_in_order = list(expected.plaintexts)
    return Dump(
        [{"_id": ObjectId("0" * 24), "SymmetricKey": upstream_wrap(pfx, data_key)}],
        documents,
        expected,
        legacy_user=users_in_order[0],
        standard_user=users_in_order[1],
        keyless_user=users_in_order[5],
    )


def write_bson(folder: Path, name: str, documents: list[dict[str, Any]], *, gzipped: bool = False) -> Path:
    """As mongodump writes a collection: the documents back to back, and a metadata file beside."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = b"".join(bson.encode(document) for document in documents)
    path = folder / (f"{name}.bson.gz" if gzipped else f"{name}.bson")
    path.write_bytes(gzip.compress(raw) if gzipped else raw)
    metadata = {"indexes": [{"v": 2, "key": {"_id": 1}, "name": "_id_"}], "collectionName": name}
    (folder / (f"{name}.metadata.json.gz" if gzipped else f"{name}.metadata.json")).write_text(
        json.dumps(metadata)
    )
    return path


def write_json(
    folder: Path, name: str, documents: list[dict[str, Any]], *, canonical: bool, array: bool = False
) -> Path:
    """As mongoexport writes a collection: extended JSON, one document per line or ``--jsonArray``."""
    folder.mkdir(parents=True, exist_ok=True)
    options = json_util.CANONICAL_JSON_OPTIONS if canonical else json_util.RELAXED_JSON_OPTIONS
    lines = [json_util.dumps(document, json_options=options) for document in documents]
    path = folder / f"{name}.json"
    path.write_text("[" + ",".join(lines) + "]" if array else "\n".join(lines) + "\n")
    return path


def uuid_forms(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The subtype-4 ids as ``{"$uuid": ...}``, the form extended JSON also allows for them."""
    rewritten = []
    for document in documents:
        parsed = json.loads(json_util.dumps(document, json_options=json_util.RELAXED_JSON_OPTIONS))
        if document["_id"].subtype == 4:
            parsed["_id"] = {"$uuid": str(document["_id"].as_uuid(UuidRepresentation.STANDARD))}
        rewritten.append(parsed)
    return rewritten


FORMS: dict[str, Callable[[Path, Dump], Path]] = {
    # What the operator points --from-mongo-dump at, for each way of dumping.
    "mongodump": lambda root, dump: (
        write_bson(root / "dump" / "keyconnector", "ApplicationData", dump.application_data),
        write_bson(root / "dump" / "keyconnector", "UserKey", dump.user_key),
        root / "dump",
    )[-1],
    "mongodump --gzip": lambda root, dump: (
        write_bson(root / "dump" / "kc", "ApplicationData", dump.application_data, gzipped=True),
        write_bson(root / "dump" / "kc", "UserKey", dump.user_key, gzipped=True),
        root / "dump" / "kc",
    )[-1],
    "mongoexport relaxed": lambda root, dump: (
        write_json(root / "export", "ApplicationData", dump.application_data, canonical=False),
        write_json(root / "export", "UserKey", dump.user_key, canonical=False),
        root / "export",
    )[-1],
    "mongoexport canonical --jsonArray": lambda root, dump: (
        write_json(root / "export", "ApplicationData", dump.application_data, canonical=True, array=True),
        write_json(root / "export", "UserKey", dump.user_key, canonical=True, array=True),
        root / "export",
    )[-1],
    "mongoexport with $uuid": lambda root, dump: (
        write_json(root / "export", "ApplicationData", dump.application_data, canonical=False),
        (root / "export" / "UserKey.json").write_text(
            "\n".join(json.dumps(document) for document in uuid_forms(dump.user_key))
        ),
        root / "export",
    )[-1],
}


def dump_env(target: Deployment) -> dict[str, str]:
    """The deployment's settings: the key pair upstream used, the database to move into."""
    env = clean_env()
    env.update(target.env())
    return env


# -- the transfer, end to end ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "kind"),
    [
        ("mongodump", "sqlite"),
        ("mongodump --gzip", "postgresql"),
        ("mongoexport relaxed", "postgresql"),
        ("mongoexport canonical --jsonArray", "sqlite"),
        ("mongoexport with $uuid", "sqlite"),
    ],
)
def test_a_dump_is_transferred_verified_and_served(
    form: str,
    kind: str,
    pfx: Pfx,
    issuer: DevIssuer,
    start_service: Any,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    dump = make_dump(pfx)
    folder = FORMS[form](tmp_path, dump)
    target = deployment(kind, pfx, tmp_path / "target", request)
    command = keyconnector("transfer", "--from-mongo-dump", str(folder), env=dump_env(target))
    assert command.returncode == 0, command.stderr
    # The summary is the result (stdout); the logs and progress are on stderr.
    assert "copied 60 record(s) (2 of them without a key), 0 failed" in command.stdout
    assert "verified 60" in command.stdout
    assert "MongoDB dump" in command.stdout
    assert pfx.password not in command.stderr + command.stdout
    assert_target_holds(target, dump.expected)

    service = start_service(target.service_env(issuer))
    with service.client() as client:
        for user in (dump.legacy_user, dump.standard_user):
            response = client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(user)}"})
            assert response.status_code == 200, response.text
            assert base64.b64decode(response.json()["key"]) == dump.expected.plaintexts[user]
        response = client.get(
            "/user-keys", headers={"Authorization": f"Bearer {issuer.mint(dump.keyless_user)}"}
        )
        assert response.status_code == 404
    service.stop()

    # Run again: the same records, upserted; still verified.
    again = keyconnector("transfer", "--from-mongo-dump", str(folder), env=dump_env(target))
    assert again.returncode == 0, again.stderr
    assert_target_holds(target, dump.expected)


def test_a_dry_run_reads_the_dump_and_writes_nothing(
    pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    dump = make_dump(pfx, users=10)
    folder = FORMS["mongodump"](tmp_path, dump)
    target = deployment("sqlite", pfx, tmp_path / "target", request)
    command = keyconnector("transfer", "--dry-run", "--from-mongo-dump", str(folder), env=dump_env(target))
    assert command.returncode == 0, command.stderr
    assert "dry run: transfer from MongoDB dump" in command.stdout
    assert "would copy 10 record(s)" in command.stdout
    assert not (target.backend.folder / "kc.db").exists()


# -- GUIDs as upstream's driver wrote them -------------------------------------------------------------

GUID = "0f8fad5b-d9cb-469f-a165-70867728950e"
LEGACY_BYTES = bytes.fromhex("5bad8f0f cbd9 9f46 a165 70867728950e")
"""``GUID`` as .NET's ``Guid.ToByteArray()`` (and so the C# legacy subtype 3) lays it out, by hand:
the first three groups little-endian, the last two as written."""
STANDARD_BYTES = bytes.fromhex(GUID.replace("-", ""))


def one_user(folder: Path, id_json: str, pfx: Pfx) -> None:
    (folder / "ApplicationData.json").write_text(
        json.dumps({"_id": {"$oid": "0" * 24}, "SymmetricKey": upstream_wrap(pfx, bytes(32))})
    )
    (folder / "UserKey.json").write_text(
        '{"_id": ' + id_json + ', "Key": null, "CreationDate": {"$date": "2024-02-03T04:05:06.789Z"}, '
        '"RevisionDate": null, "LastAccessDate": {"$date": {"$numberLong": "1706933106789"}}}\n'
    )


@pytest.mark.parametrize(
    "id_json",
    [
        '{"$binary": {"base64": "' + base64.b64encode(LEGACY_BYTES).decode() + '", "subType": "03"}}',
        '{"$binary": "' + base64.b64encode(LEGACY_BYTES).decode() + '", "$type": "3"}',
        '{"$binary": {"base64": "' + base64.b64encode(STANDARD_BYTES).decode() + '", "subType": "04"}}',
        '{"$uuid": "' + GUID + '"}',
        '"' + GUID.upper() + '"',
    ],
    ids=["subtype 3 canonical", "subtype 3 legacy JSON", "subtype 4", "$uuid", "string"],
)
def test_each_guid_form_reads_as_the_same_user(id_json: str, pfx: Pfx, tmp_path: Path) -> None:
    one_user(tmp_path, id_json, pfx)
    records = read_mongo_dump(tmp_path)._records
    assert list(records) == [uuid.UUID(GUID)]
    record = records[uuid.UUID(GUID)]
    assert record.creation_date == datetime(2024, 2, 3, 4, 5, 6, 789000)
    assert record.last_access_date == datetime(2024, 2, 3, 4, 5, 6, 789000)
    assert (record.key, record.revision_date) == (None, None)


def test_an_export_re_encoded_as_utf16_by_a_windows_shell_is_read(pfx: Pfx, tmp_path: Path) -> None:
    one_user(tmp_path, '{"$uuid": "' + GUID + '"}', pfx)
    path = tmp_path / "UserKey.json"
    path.write_bytes(path.read_text().encode("utf-16"))
    assert list(read_mongo_dump(tmp_path)._records) == [uuid.UUID(GUID)]


def test_guids_in_bson_read_in_both_subtypes(pfx: Pfx, tmp_path: Path) -> None:
    created = datetime(2024, 1, 1)
    write_bson(tmp_path, "ApplicationData", [{"_id": ObjectId("0" * 24), "SymmetricKey": "x"}])
    other = uuid.UUID("1b4e28ba-2fa1-41d2-883f-0016d3cca427")
    write_bson(
        tmp_path,
        "UserKey",
        [
            {"_id": Binary(LEGACY_BYTES, 3), "Key": "a", "CreationDate": created},
            {"_id": Binary(other.bytes, 4), "Key": "b", "CreationDate": created},
        ],
    )
    records = read_mongo_dump(tmp_path)._records
    assert {user: record.key for user, record in records.items()} == {uuid.UUID(GUID): "a", other: "b"}


def test_a_subtype_3_guid_in_another_byte_order_is_refused_before_anything_is_written(
    pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A Python or Java driver's legacy order read as .NET's would file keys under wrong users."""
    folder = tmp_path / "export"
    folder.mkdir()
    one_user(
        folder,
        '{"$binary": {"base64": "' + base64.b64encode(STANDARD_BYTES).decode() + '", "subType": "03"}}',
        pfx,
    )
    target = deployment("sqlite", pfx, tmp_path / "target", request)
    command = keyconnector("transfer", "--from-mongo-dump", str(folder), env=dump_env(target))
    assert command.returncode == 1
    assert (
        "UserKey.json, line 1: _id is binary subtype 3 but not in .NET's legacy byte order" in command.stderr
    )
    assert GUID in command.stderr
    assert not (target.backend.folder / "kc.db").exists()


# -- wrong or missing files ----------------------------------------------------------------------------


def _only_user_key(root: Path, dump: Dump) -> Path:
    write_bson(root / "dump" / "keyconnector", "UserKey", dump.user_key)
    return root / "dump"


def _both_kinds(root: Path, dump: Dump) -> Path:
    folder = FORMS["mongodump"](root, dump) / "keyconnector"
    write_json(folder, "UserKey", dump.user_key, canonical=True)
    return folder


def _two_databases(root: Path, dump: Dump) -> Path:
    FORMS["mongodump"](root, dump)
    write_bson(root / "dump" / "other", "UserKey", dump.user_key)
    return root / "dump"


def _truncated(root: Path, dump: Dump) -> Path:
    folder = FORMS["mongodump"](root, dump)
    path = folder / "keyconnector" / "UserKey.bson"
    path.write_bytes(path.read_bytes()[:-30])
    return folder


def _bad_json(root: Path, dump: Dump) -> Path:
    folder = FORMS["mongoexport relaxed"](root, dump)
    path = folder / "UserKey.json"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:40]
    path.write_text("\n".join(lines))
    return folder


def _archive(root: Path, dump: Dump) -> Path:
    path = root / "keyconnector.archive"
    path.write_bytes(b"\x6d\xe2\x99\x81" + bytes(64))
    return path


def _no_data_key(root: Path, dump: Dump) -> Path:
    dump.application_data.clear()
    return FORMS["mongodump"](root, dump)


def _two_data_keys(root: Path, dump: Dump) -> Path:
    dump.application_data.append({"_id": ObjectId(), "SymmetricKey": "c29tZXRoaW5nIGVsc2U="})
    return FORMS["mongoexport relaxed"](root, dump)


def _not_utf8(root: Path, dump: Dump) -> Path:
    folder = FORMS["mongoexport relaxed"](root, dump)
    (folder / "UserKey.json").write_bytes(b"\xc3\x28 Latin-1, not UTF-8")
    return folder


def _missing_date(root: Path, dump: Dump) -> Path:
    del dump.user_key[7]["CreationDate"]
    return FORMS["mongodump"](root, dump)


REFUSALS: dict[str, tuple[Callable[[Path, Dump], Path], int, str]] = {
    "no such folder": (lambda root, dump: root / "nowhere", 2, "nowhere does not exist"),
    "an archive file": (_archive, 2, "is a file, not a folder"),
    "an empty folder": (lambda root, dump: root, 2, "holds no dump of upstream's collections"),
    "UserKey only": (_only_user_key, 2, "has UserKey.bson but no ApplicationData (.bson, .bson.gz or .json)"),
    "UserKey twice": (_both_kinds, 2, "has UserKey twice (UserKey.bson, UserKey.json)"),
    "two databases": (_two_databases, 2, "holds dumps of several databases"),
    "a truncated BSON file": (_truncated, 1, "UserKey.bson: not a whole mongodump BSON file after document"),
    "a broken JSON line": (_bad_json, 1, "UserKey.json, line 2: not mongoexport's extended JSON"),
    "no data key": (_no_data_key, 1, "the source has no data key, so nothing to transfer (MongoDB dump"),
    "two data keys": (_two_data_keys, 1, "ApplicationData holds 2 different SymmetricKey values"),
    "a JSON file not in UTF-8": (_not_utf8, 1, "UserKey.json: not UTF-8 text, as mongoexport writes it"),
    "a missing date": (_missing_date, 1, "UserKey.bson, document 8: CreationDate is missing"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_wrong_or_missing_files_are_refused_clearly_and_nothing_is_written(
    case: str, pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    make, code, message = REFUSALS[case]
    root = tmp_path / "dumps"
    root.mkdir()
    folder = make(root, make_dump(pfx, users=12))
    target = deployment("sqlite", pfx, tmp_path / "target", request)
    command = keyconnector("transfer", "--from-mongo-dump", str(folder), env=dump_env(target))
    assert command.returncode == code, command.stderr
    assert message in command.stderr
    assert "Traceback" not in command.stderr
    assert not (target.backend.folder / "kc.db").exists()


def test_a_dump_the_key_pair_does_not_open_creates_no_target(
    pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The wrong key pair (another PFX than upstream's) must not first give the target a data key."""
    from keyconnector.keypairs.generate import self_signed_pfx

    other = tmp_path / "other.pfx"
    other.write_bytes(self_signed_pfx("other-password", bits=2048))
    folder = FORMS["mongodump"](tmp_path, make_dump(Pfx(other, "other-password"), users=6))
    target = deployment("sqlite", pfx, tmp_path / "target", request)
    command = keyconnector("transfer", "--from-mongo-dump", str(folder), env=dump_env(target))
    assert command.returncode == 1, command.stderr
    assert "the source:" in command.stderr
    assert not (target.backend.folder / "kc.db").exists()


def test_the_target_cannot_be_mongo_itself(pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """An operator who kept upstream's settings is told which setting to change."""
    folder = FORMS["mongodump"](tmp_path, make_dump(pfx, users=6))
    target = deployment("sqlite", pfx, tmp_path / "target", request)
    env = dump_env(target)
    env[f"{SETTINGS}database__provider"] = "mongo"
    env[f"{SETTINGS}database__mongoConnectionString"] = "mongodb://mongo:27017"
    command = keyconnector("transfer", "--from-mongo-dump", str(folder), env=env)
    assert command.returncode == 2
    assert f"{SETTINGS}database__provider: is mongo, the database being left" in command.stderr


def test_a_missing_pymongo_names_the_extra(pfx: Pfx, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Without pymongo (here: shadowed by a module that fails to import, as a missing one does)."""
    folder = FORMS["mongodump"](tmp_path, make_dump(pfx, users=6))
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "pymongo.py").write_text("raise ImportError('No module named pymongo')\n")
    target = deployment("sqlite", pfx, tmp_path / "target", request)
    env = dump_env(target)
    env["PYTHONPATH"] = f"{shadow}:{env.get('PYTHONPATH', '')}"
    command = keyconnector("transfer", "--from-mongo-dump", str(folder), env=env)
    assert command.returncode == 2
    assert "--from-mongo-dump: reading a MongoDB dump needs the Python package 'pymongo'" in command.stderr
    assert "pip install 'keyconnector[mongo]'" in command.stderr


def test_serve_on_mongo_names_the_way_out(pfx: Pfx, issuer: DevIssuer, tmp_path: Path) -> None:
    from tests.conftest import base_env

    env = clean_env()
    env.update(base_env(issuer, pfx, tmp_path / "kc.db"))
    env[f"{SETTINGS}database__provider"] = "mongo"
    command = keyconnector("serve", "--port", str(free_port()), env=env, timeout=60)
    assert command.returncode == 2
    assert "keyconnector transfer --from-mongo-dump" in command.stderr
    assert not (tmp_path / "kc.db").exists()
