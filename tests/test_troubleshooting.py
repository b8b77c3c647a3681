"""docs/troubleshooting.md against the code: every message documented, no entry stale, and the
commonest failures, provoked for real, printing text the page explains.

Why both directions: a message added without an entry leaves an operator with nothing to search
for, and an entry whose message was reworded sends them to advice for a text they will never see.
The real failures prove the matcher finds what the service actually prints, not just what the
extractor believes it prints.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Pfx, base_env
from tests.support import messages
from tests.support.envelopes import upstream_seal, upstream_wrap
from tests.support.messages import CALLS, IGNORED_CLASSES, PAGE, compare, extract, find_on_page, page_entries
from tests.support.upstream import Row, build_sqlite


@pytest.fixture(scope="module")
def page_text() -> str:
    return PAGE.read_text()


@pytest.fixture(scope="module")
def entries(page_text: str) -> list[str]:
    return [text for _, text in page_entries(page_text)]


def test_every_message_in_the_code_is_on_the_page(page_text: str) -> None:
    report = compare(page_text, extract())
    missing = sorted({f"{m.where()}: - `{m.display}`" for m in report.undocumented})
    assert not missing, (
        f"{len(missing)} message(s) not documented in docs/troubleshooting.md "
        "(run `python -m tests.support.messages`):\n" + "\n".join(missing[:40])
    )


def test_no_entry_on_the_page_is_stale(page_text: str) -> None:
    report = compare(page_text, extract())
    stale = [f"line {line}: {text}" for line, text in report.stale]
    assert not stale, "entries whose message no longer exists in the code:\n" + "\n".join(stale)


def test_the_index_lists_every_entry_under_its_section(page_text: str) -> None:
    """The index at the end is what an operator scans for their message: an entry missing from it,
    or linking to another section, is as good as undocumented."""
    assert page_text == messages.with_index(page_text), (
        "the index of docs/troubleshooting.md is not current: run `python -m tests.support.messages --index`"
    )
    indexed = [
        line for line in page_text.split(messages.INDEX_HEADING, 1)[1].splitlines() if line.startswith("- [")
    ]
    assert len(indexed) >= len({entry for entry, _ in messages.entry_sections(page_text)}) > 400


def test_every_link_within_the_page_leads_to_a_heading(page_text: str) -> None:
    anchors = set()
    seen: dict[str, int] = {}
    for line in page_text.splitlines():
        if line.startswith("#"):
            base = messages.slug(line.lstrip("#"))
            anchors.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    links = set(re.findall(r"\]\(#([^)]+)\)", page_text))
    assert links - anchors == set(), sorted(links - anchors)


def test_the_page_is_organised_by_symptom(page_text: str) -> None:
    sections = [line[3:] for line in page_text.splitlines() if line.startswith("## ")]
    for symptom in (
        "`serve` does not start",
        "`serve` runs but answers 503",
        "Clients cannot log in (401, 403)",
        "`keyconnector check` fails or warns",
        "Slow, or too many requests (408, 429)",
        "After a takeover, or a database that is not what it should be",
    ):
        assert symptom in sections, sections
    assert sections[-1] == messages.INDEX_HEADING[3:]


def test_the_page_documents_hundreds_of_messages(entries: list[str]) -> None:
    """A floor, so that a parser change that silently reads nothing cannot pass the two tests above
    (an empty page matches an extractor that finds nothing)."""
    assert len(extract()) > 400
    assert len(entries) > 400


def test_every_exception_class_is_known_to_the_extractor() -> None:
    """A new exception class carries messages the extractor would not look for."""
    unknown = {
        name: file
        for name, file in messages.exception_classes().items()
        if name not in CALLS and name not in IGNORED_CLASSES
    }
    assert not unknown, f"add these to tests/support/messages.py CALLS (or IGNORED_CLASSES): {unknown}"


# --------------------------------------------------------------------------------------------------
# The extractor on a module written for the purpose: what it must find, and how matching tolerates
# what a person copies.


SAMPLE = """
import logging
from keyconnector.errors import ConfigurationError, UnavailableError, StorageError
log = logging.getLogger("keyconnector")
_GONE = "the thing is gone"

def _describe(path):
    return f"no file at {path}"

def f(prefix, path, n):
    if n:
        raise ConfigurationError(f"{prefix}.filesystemPath", _describe(path))
    log.warning("retrying %d times for %s", n, path)
    problem = "cannot read " + path
    raise UnavailableError("database", problem)

def g(x):
    raise StorageError(_GONE if x else f"{x}: {x}")

def h():
    print("done", file=None)
"""


def test_the_extractor_finds_each_construction(tmp_path: Path) -> None:
    (tmp_path / "sample.py").write_text(SAMPLE)
    found = {m.display for m in extract(tmp_path)}
    assert found == {
        "keyConnectorSettings__<prefix>__filesystemPath: no file at <path>",
        "retrying <value> times for <value>",
        "database is unavailable: cannot read <path>",
        "the thing is gone",
    }, found  # the `f"{x}: {x}"` variant has no words of its own, and print(file=None) is no message


def test_matching_ignores_placeholder_names_quotes_and_whitespace(tmp_path: Path) -> None:
    (tmp_path / "sample.py").write_text(SAMPLE)
    found = extract(tmp_path)
    page = textwrap.dedent(
        """\
        - `keyConnectorSettings__<the prefix>__filesystemPath:   no file at {path}`
        - `retrying <n> times for <file>`
        - `database is unavailable: cannot read <path>`
        - `the thing is gone`
        """
    )
    report = compare(page, found)
    assert report.undocumented == [] and report.stale == []


def test_a_new_message_or_a_reworded_one_fails(tmp_path: Path) -> None:
    (tmp_path / "sample.py").write_text(SAMPLE.replace("the thing is gone", "the thing has gone away"))
    page = "\n".join(
        [
            "- `keyConnectorSettings__<prefix>__filesystemPath: no file at <path>`",
            "- `retrying <n> times for <file>`",
            "- `database is unavailable: cannot read <path>`",
            "- `the thing is gone`",
        ]
    )
    report = compare(page, extract(tmp_path))
    assert [m.display for m in report.undocumented] == ["the thing has gone away"]
    assert [text for _, text in report.stale] == ["the thing is gone"]


def test_real_output_is_found_with_its_values_filled_in() -> None:
    entries = [
        "keyConnectorSettings__<prefix>__filesystemPath: "
        "no PFX file at <path> (make one with 'keyconnector init')"
    ]
    printed = (
        "keyconnector: configuration error: keyConnectorSettings__certificate__filesystemPath: "
        'no PFX file at /etc/x.pfx (make one with "keyconnector init")'
    )
    assert find_on_page(printed, entries) == entries
    assert find_on_page("keyconnector: something else entirely", entries) == []


# --------------------------------------------------------------------------------------------------
# The commonest failures, for real: the printed line must be explained on the page.


def run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyconnector", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def explained(output: str, entries: list[str], must_contain: str) -> list[str]:
    """The page entries found in the printed lines that mention ``must_contain``."""
    lines = [line for line in output.splitlines() if must_contain in line]
    assert lines, f"nothing about {must_contain!r} was printed:\n{output}"
    found: list[str] = []
    for line in lines:
        found += find_on_page(line, entries)
    return found


def test_check_with_a_wrong_pfx_password(
    issuer: DevIssuer, pfx: Pfx, tmp_path: Path, entries: list[str]
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__certificate__filesystemPassword"] = "not-the-password"
    result = run("check", env=env)
    assert result.returncode == 1
    found = explained(result.stdout, entries, "FAIL key pair")
    assert any("the password is wrong" in entry for entry in found), found


def test_serve_with_a_missing_pfx_over_a_data_key(
    issuer: DevIssuer, pfx: Pfx, tmp_path: Path, entries: list[str]
) -> None:
    """The advice that depends on the database (restore, not init) is on the page as printed."""
    database = tmp_path / "kc.db"
    data_key = secrets.token_bytes(32)
    row = Row(
        str(uuid.uuid4()).upper(), upstream_seal(data_key, secrets.token_bytes(32)), "2024-01-01 00:00:00"
    )
    build_sqlite(database, [row], upstream_wrap(pfx, data_key))
    env = base_env(issuer, pfx, database)
    env["keyConnectorSettings__certificate__filesystemPath"] = str(tmp_path / "lost.pfx")
    result = run("serve", "--port", str(free_port()), env=env)
    assert result.returncode == 2
    found = explained(result.stderr, entries, "configuration error")
    assert any("restore the PFX that wrapped it from a backup" in entry for entry in found), found
    assert any("no PFX file at" in entry for entry in found), found


def test_check_with_an_unknown_setting_name(
    issuer: DevIssuer, pfx: Pfx, tmp_path: Path, entries: list[str]
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__databse__provider"] = "sqlite"
    result = run("check", env=env)
    found = explained(result.stdout + result.stderr, entries, "databse")
    assert "unknown setting <detail> is ignored (a typo? did you mean <setting>?)" in found
    assert "ignoring unknown setting <detail> (a typo? did you mean <setting>?)" in found


def test_serve_with_a_database_folder_that_does_not_exist(
    issuer: DevIssuer, pfx: Pfx, tmp_path: Path, entries: list[str]
) -> None:
    env = base_env(issuer, pfx, tmp_path / "missing-folder" / "kc.db")
    result = run("serve", "--port", str(free_port()), env=env)
    assert result.returncode == 2
    found = explained(result.stderr, entries, "configuration error")
    assert any("of the database file does not exist" in entry for entry in found), found


def test_serve_with_the_mongo_provider(
    issuer: DevIssuer, pfx: Pfx, tmp_path: Path, entries: list[str]
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__database__provider"] = "mongo"
    result = run("serve", "--port", str(free_port()), env=env)
    assert result.returncode == 2
    found = explained(result.stderr, entries, "MongoDB")
    assert any("MongoDB support was removed" in entry for entry in found), found
    assert "keyconnector transfer --from-mongo-dump" in result.stderr


def test_check_with_an_unreachable_identity_server(
    issuer: DevIssuer, pfx: Pfx, tmp_path: Path, entries: list[str]
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db")
    env["keyConnectorSettings__identityServerUri"] = f"http://127.0.0.1:{free_port()}"
    result = run("check", env=env)
    assert result.returncode == 3  # only a dependency is unreachable (ExitCode.UNAVAILABLE)
    found = explained(result.stdout, entries, "FAIL identity server")
    assert any("cannot be fetched" in entry for entry in found), found


def test_an_expired_token_on_user_keys(
    issuer: DevIssuer, pfx: Pfx, tmp_path: Path, start_service: object, entries: list[str]
) -> None:
    service = start_service(base_env(issuer, pfx, tmp_path / "kc.db"))  # type: ignore[operator]
    token = issuer.mint(issued_at=int(time.time()) - 7200, lifetime=60)
    with service.client() as client:
        answer = client.get("/user-keys", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 401
    found = find_on_page(answer.json()["message"], entries)
    assert found == ["the token has expired"], found
