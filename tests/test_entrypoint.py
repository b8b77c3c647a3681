"""The image's entrypoint in the layout of Bitwarden's installer (``bitwarden.sh``), run for real as root.

The installer runs Key Connector as the compose service ``key-connector`` with the volumes
``../key-connector:/etc/bitwarden/key-connector``, ``../ca-certificates:/etc/bitwarden/ca-certificates``
and ``../logs/key-connector:/etc/bitwarden/logs``, and the env files ``../env/uid.env`` (``LOCAL_UID``,
``LOCAL_GID``) and ``../env/key-connector.override.env`` (the generated settings). Upstream's image
starts as root, gives ``/etc/bitwarden`` to those ids (65534 when 0 or unset) and runs the service as
them (PROTOCOL.md section 6). Swapping only the image must keep all of that working.

These tests run as root on this machine, so the script runs as the container would start it, with
``KEYCONNECTOR_BITWARDEN_DIR`` pointing at a temporary folder in place of ``/etc/bitwarden``. Two
things stand in for the image: the stepped-down user cannot reach this checkout's interpreter (it
lives under ``/root``), so the service runs on the system's Python 3.11 with the virtualenv's
packages on ``PYTHONPATH``; and pytest's temporary folders are root-only, so the layout lives in a
folder anyone may enter, as ``/etc/bitwarden``'s parent is.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import stat
import string
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import keyconnector
from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.devtools.tls import local_tls_files
from keyconnector.runtime.settings import read_env_file
from tests.conftest import Pfx, Service
from tests.support.envelopes import upstream_open, upstream_seal, upstream_unwrap, upstream_wrap

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "deploy" / "docker" / "entrypoint.sh"
SYSTEM_PYTHON = Path("/usr/bin/python3")
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the entrypoint's step-down needs root")


# --------------------------------------------------------------------------------------------------
# The installer's layout


@dataclass(frozen=True)
class Installer:
    """A ``key-connector`` deployment as bitwarden.sh leaves it, under ``root`` (its /etc/bitwarden)."""

    root: Path
    env_file: Path
    pfx: Pfx
    data_key: bytes
    users: dict[uuid.UUID, bytes]

    @property
    def data_json(self) -> Path:
        return self.root / "key-connector" / "data.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


@pytest.fixture(scope="module")
def installer_pfx(tmp_path_factory: pytest.TempPathFactory) -> Pfx:
    """bwkc.pfx made as the installer makes it: openssl, RSA-4096, a random 32-character password."""
    folder = tmp_path_factory.mktemp("installer-pfx")
    password = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
    key, cert, pfx = folder / "bwkc.key", folder / "bwkc.crt", folder / "bwkc.pfx"
    request = "req -x509 -newkey rsa:4096 -sha256 -nodes -subj /CN=Bitwarden_Key_Connector -days 36500"
    subprocess.run(
        ["openssl", *request.split(), "-keyout", key, "-out", cert], check=True, capture_output=True
    )
    export = ["pkcs12", "-export", "-out", pfx, "-inkey", key, "-in", cert, "-certfile", cert]
    subprocess.run(["openssl", *export, "-passout", f"pass:{password}"], check=True, capture_output=True)
    return Pfx(pfx, password)


@pytest.fixture
def world() -> Iterator[Path]:
    """A folder the stepped-down user can enter (pytest's own are root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="kc-entrypoint-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def installer_layout(base: Path, pfx: Pfx, identity_url: str, uid_env: str) -> Installer:
    """The files bitwarden.sh makes, owned by root as a root-run installer leaves them.

    ``env_file`` holds what compose's ``env_file:`` list passes to the container: ``uid.env``, then
    the generated ``key-connector.override.env``, plus the ``Serilog__`` lines operators keep there.
    ``identityServerUri`` is the installer's ``http://identity:5000`` in real life; the test's own
    identity server stands in for it."""
    root = base / "etc-bitwarden"
    (root / "key-connector").mkdir(parents=True)
    (root / "ca-certificates").mkdir()
    (root / "logs").mkdir()
    shutil.copy(pfx.path, root / "key-connector" / "bwkc.pfx")
    layout_pfx = Pfx(root / "key-connector" / "bwkc.pfx", pfx.password)
    data_key = secrets.token_bytes(32)
    users = {uuid.uuid4(): secrets.token_bytes(32) for _ in range(3)}
    document = {  # the release's JSON file: lower-case ids, lastAccessDate never written back
        "symmetricKey": upstream_wrap(layout_pfx, data_key),
        "userKey": [
            {
                "id": str(user),
                "key": upstream_seal(data_key, key),
                "creationDate": "2025-11-20T09:15:00.1234567Z",
                "revisionDate": None,
                "lastAccessDate": None,
            }
            for user, key in users.items()
        ],
    }
    (root / "key-connector" / "data.json").write_text(json.dumps(document, indent=2))
    env_file = base / "key-connector.env"
    env_file.write_text(
        uid_env
        + "keyConnectorSettings__webVaultUri=https://bitwarden.example.com\n"
        + f"keyConnectorSettings__identityServerUri={identity_url}\n"
        + "keyConnectorSettings__database__provider=json\n"
        + f"keyConnectorSettings__database__jsonFilePath={root}/key-connector/data.json\n"
        + "keyConnectorSettings__rsaKey__provider=certificate\n"
        + "keyConnectorSettings__certificate__provider=filesystem\n"
        + f"keyConnectorSettings__certificate__filesystemPath={root}/key-connector/bwkc.pfx\n"
        + f"keyConnectorSettings__certificate__filesystemPassword={pfx.password}\n"
        + f"keyConnectorSettings__caCertificatesDirectory={root}/ca-certificates\n"
        + "Serilog__MinimumLevel__Default=Information\n"
        + "Serilog__MinimumLevel__Override__Microsoft=Warning\n"
    )
    env_file.chmod(0o600)
    return Installer(root, env_file, layout_pfx, data_key, users)


# --------------------------------------------------------------------------------------------------
# Running the script


def _image_env(world: Path, root: Path) -> dict[str, str]:
    """The container's environment, minus settings: keyconnector runnable by any user, the data
    folder standing in for /etc/bitwarden, the CA bundle in a world-writable folder."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} is needed to run the service as another user")
    packages = sysconfig.get_paths()["purelib"]
    source = Path(keyconnector.__file__).resolve().parents[1]
    bin_dir = world / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "keyconnector"  # the image's console script, on the system interpreter
    wrapper.write_text(f'#!/bin/sh\nexec {SYSTEM_PYTHON} -m keyconnector "$@"\n')
    wrapper.chmod(0o755)
    run = world / "run"
    run.mkdir(exist_ok=True)
    run.chmod(0o1777)
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": f"{source}{os.pathsep}{packages}",
        "PYTHONDONTWRITEBYTECODE": "1",
        "KEYCONNECTOR_BIN": str(wrapper),
        "KEYCONNECTOR_PYTHON": str(SYSTEM_PYTHON),
        "KEYCONNECTOR_BITWARDEN_DIR": str(root),
        "KEYCONNECTOR_CA_BUNDLE": str(run / "ca-bundle.pem"),
        "KEYCONNECTOR_SYSTEM_CA_BUNDLE": str(SYSTEM_BUNDLE),
    }


def _entrypoint(
    args: list[str], env: dict[str, str], prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, "bash", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=60
    )


def _owners(root: Path) -> set[tuple[int, int]]:
    """Owner and group of everything under root (links themselves, never their targets)."""
    found = {(root.lstat().st_uid, root.lstat().st_gid)}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            info = (Path(folder) / name).lstat()
            found.add((info.st_uid, info.st_gid))
    return found


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().partition("=")[::2] for e in entries if b"=" in e)


# A probe run by the entrypoint in place of the service: who it runs as and what it was given.
PROBE = """
id -u; id -g; id -G
grep -E '^(CapEff|CapPrm|CapAmb|NoNewPrivs):' /proc/self/status
printf 'logfile=%s\\n' "${keyConnectorSettings__logging__file-unset}"
touch "$KEYCONNECTOR_BITWARDEN_DIR/key-connector/written-by-the-service" && echo wrote
"""


def _probe(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    result = {"uid": lines[0], "gid": lines[1], "groups": lines[2]}
    for line in lines[3:]:
        key, sep, value = line.partition(":") if ":" in line else line.partition("=")
        result[key] = value.strip() if sep else key
    return result


# --------------------------------------------------------------------------------------------------
# The tests


def test_the_installers_deployment_runs_as_local_uid_from_its_layout_with_only_the_image_swapped(
    world: Path, installer_pfx: Pfx, issuer: DevIssuer
) -> None:
    """The whole takeover of a bitwarden.sh deployment through the entrypoint, as root starts it: the
    service runs as uid.env's ids with nothing else, owns the installer's files, serves the users of
    the installer's data.json, trusts the mounted CA and logs into the installer's logs folder."""
    layout = installer_layout(world, installer_pfx, issuer.url, "LOCAL_UID=12345\nLOCAL_GID=12346\n")
    (world / "corp-ca").mkdir()
    corp = local_tls_files(world / "corp-ca", "Corp Root CA")
    shutil.copy(corp.ca, layout.root / "ca-certificates" / "corp.crt")
    assert _owners(layout.root) == {(0, 0)}
    port = free_port()
    env = _image_env(world, layout.root) | read_env_file(layout.env_file)
    env["ASPNETCORE_URLS"] = f"http://127.0.0.1:{port}"
    env["keyConnectorSettings__shutdown__drainSeconds"] = "1"
    log = world / "container.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["bash", str(ENTRYPOINT)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for user, key in layout.users.items():
                response = client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(user)}"})
                assert response.status_code == 200, response.text
                assert base64.b64decode(response.json()["key"]) == key
            newcomer, new_key = uuid.uuid4(), secrets.token_bytes(32)
            response = client.post(
                "/user-keys",
                headers={"Authorization": f"Bearer {issuer.mint(newcomer)}"},
                json={"key": base64.b64encode(new_key).decode()},
            )
            assert response.status_code == 200, response.text

        # The server is the process started (exec all the way), as 12345:12346 and nothing more.
        status = _status(process.pid)
        assert status["Uid"].split() == ["12345"] * 4
        assert status["Gid"].split() == ["12346"] * 4
        assert status["Groups"] == ""
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
        assert status["NoNewPrivs"] == "1"
        # Every worker too.
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and entry.name != str(process.pid):
                try:
                    if os.getsid(int(entry.name)) == process.pid:
                        assert _status(int(entry.name))["Uid"].split()[0] == "12345"
                except (ProcessLookupError, FileNotFoundError):
                    continue

        # The installer's files, and what the service wrote since, belong to LOCAL_UID/LOCAL_GID.
        assert _owners(layout.root) == {(12345, 12346)}
        written = json.loads(layout.data_json.read_text())
        assert upstream_unwrap(layout.pfx, written["symmetricKey"]) == layout.data_key
        assert {entry["id"] for entry in written["userKey"]} >= {str(u) for u in layout.users} | {
            str(newcomer)
        }
        for entry in written["userKey"]:
            if entry["id"] in {str(u) for u in layout.users}:
                assert upstream_open(layout.data_key, entry["key"]) == layout.users[uuid.UUID(entry["id"])]

        # The mounted CA is in the trust the service and its libraries use.
        environ = _environ(process.pid)
        bundle = Path(environ["SSL_CERT_FILE"])
        assert corp.ca.read_text() in bundle.read_text()
        assert bundle.stat().st_uid == 12345

        # Logs where upstream's were, not readable by others.
        log_file = layout.logs / "keyconnector.log"
        assert environ["keyConnectorSettings__logging__file"] == str(log_file)
        deadline = time.monotonic() + 10
        while "POST /user-keys 200" not in (log_file.read_text() if log_file.exists() else ""):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert "GET /user-keys 200" in log_file.read_text()
        assert stat.S_IMODE(log_file.stat().st_mode) & 0o007 == 0
        assert "running as uid 12345, gid 12346" in log.read_text()
        assert installer_pfx.password not in log.read_text() + log_file.read_text()

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_the_installers_env_file_serves_with_serve_env_file(
    tmp_path: Path, installer_pfx: Pfx, issuer: DevIssuer, start_service: Callable[..., Service]
) -> None:
    """The same generated env file given to ``keyconnector serve --env-file`` (a plain host, or a
    check before the swap): uid.env's and Serilog's lines are not settings and stop nothing."""
    layout = installer_layout(tmp_path, installer_pfx, issuer.url, "LOCAL_UID=1000\nLOCAL_GID=1000\n")
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("keyconnectorsettings")}
    env.pop("ASPNETCORE_URLS", None)
    checked = subprocess.run(
        [sys.executable, "-m", "keyconnector", "check", "--env-file", str(layout.env_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    service: Service = start_service(env, extra_args=("--env-file", str(layout.env_file)))
    with service.client() as client:
        for user, key in layout.users.items():
            response = client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(user)}"})
            assert response.status_code == 200, response.text
            assert base64.b64decode(response.json()["key"]) == key
    assert "unknown setting" not in service.logs().lower()


@pytest.mark.parametrize(
    ("uid_env", "expected"),
    [
        ("LOCAL_UID=12345\nLOCAL_GID=12346\n", (12345, 12346)),
        ("", (NOBODY, NOBODY)),  # uid.env empty: the installer's Setup creates it so
        ("LOCAL_UID=0\nLOCAL_GID=0\n", (NOBODY, NOBODY)),  # a host root never makes the service root
        ("LOCAL_UID=\nLOCAL_GID=0100\n", (NOBODY, 100)),  # empty is unset; decimal, not octal
    ],
    ids=["ids", "unset", "zero", "empty-and-leading-zero"],
)
def test_the_entrypoint_steps_down_to_local_uid_and_gives_it_the_data_folder(
    world: Path, uid_env: str, expected: tuple[int, int]
) -> None:
    root = world / "etc-bitwarden"
    (root / "key-connector").mkdir(parents=True)
    (root / "logs").mkdir()
    (root / "key-connector" / "data.json").write_text("{}")
    outside = world / "outside.txt"  # a root file a planted link points to: never handed over
    outside.write_text("root's\n")
    (root / "key-connector" / "escape").symlink_to(outside)
    env = _image_env(world, root) | {k: v for k, _, v in (line.partition("=") for line in uid_env.split())}
    done = _entrypoint(["sh", "-c", PROBE], env)
    probe = _probe(done)
    uid, gid = expected
    assert (int(probe["uid"]), int(probe["gid"]), probe["groups"]) == (uid, gid, str(gid))
    assert int(probe["CapEff"], 16) == int(probe["CapPrm"], 16) == int(probe["CapAmb"], 16) == 0
    assert probe["NoNewPrivs"] == "1"
    assert "wrote" in probe
    assert _owners(root) == {(uid, gid)}
    assert (outside.stat().st_uid, outside.stat().st_gid) == (0, 0)
    assert probe["logfile"] == str(root / "logs" / "keyconnector.log")
    assert f"running as uid {uid}, gid {gid}" in done.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [("LOCAL_UID", "bitwarden"), ("LOCAL_UID", "-1"), ("LOCAL_GID", "4294967295"), ("LOCAL_GID", "1e3")],
)
def test_an_id_that_is_not_one_is_refused_before_anything_runs(world: Path, name: str, value: str) -> None:
    root = world / "etc-bitwarden"
    root.mkdir()
    marker = world / "ran"
    done = _entrypoint(["touch", str(marker)], _image_env(world, root) | {name: value})
    assert done.returncode == 64
    assert f"{name}={value} is not a" in done.stderr and "uid.env" in done.stderr
    assert not marker.exists()
    assert _owners(root) == {(0, 0)}


def test_root_that_may_not_change_user_is_refused_rather_than_served(world: Path) -> None:
    """``cap_drop: ALL`` on a root container: stepping down is impossible, so nothing runs at all."""
    root = world / "etc-bitwarden"
    root.mkdir()
    marker = world / "ran"
    without = ("setpriv", "--bounding-set=-setuid,-setgid", "--")
    done = _entrypoint(["touch", str(marker)], _image_env(world, root) | {"LOCAL_UID": "12345"}, without)
    assert done.returncode == 1
    assert "never runs as root" in done.stderr and "--user" in done.stderr and "SETUID" in done.stderr
    assert not marker.exists()


def test_a_container_started_as_a_user_keeps_it_and_says_uid_env_is_not_applied(world: Path) -> None:
    """``docker run --user`` or Kubernetes' runAsUser: no step-down, no re-owning, one line saying so."""
    root = world / "etc-bitwarden"
    (root / "key-connector").mkdir(parents=True)
    (root / "logs").mkdir()
    os.chown(root / "key-connector", 12345, 12345)
    as_user = ("setpriv", "--reuid=12345", "--regid=12345", "--clear-groups", "--")
    env = _image_env(world, root) | {"LOCAL_UID": "23456", "LOCAL_GID": "23456"}
    done = _entrypoint(["sh", "-c", PROBE], env, as_user)
    probe = _probe(done)
    assert (probe["uid"], probe["gid"]) == ("12345", "12345")
    assert "LOCAL_UID/LOCAL_GID (23456:23456) not applied" in done.stderr
    assert (root.stat().st_uid, (root / "logs").stat().st_uid) == (0, 0)
    # The logs folder is root's and not writable: said, and the service logs to stderr only.
    assert probe["logfile"] == "unset"
    assert "is not writable by uid 12345" in done.stderr


def test_an_operators_log_file_setting_wins_and_no_logs_folder_means_none(world: Path) -> None:
    root = world / "etc-bitwarden"
    (root / "key-connector").mkdir(parents=True)
    (root / "logs").mkdir()
    env = _image_env(world, root)
    # Any spelling of the name counts, as the settings loader's; empty means "no file".
    chosen = _probe(_entrypoint(["sh", "-c", PROBE], env | {"KEYCONNECTORSETTINGS__LOGGING__FILE": ""}))
    assert chosen["logfile"] == "unset"
    (root / "logs").rmdir()
    none = _probe(_entrypoint(["sh", "-c", PROBE], env))
    assert none["logfile"] == "unset"
