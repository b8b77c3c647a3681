"""The built wheel, installed as an operator would: `pip install 'keyconnector[postgres,aws]'` into a
fresh virtualenv, then the installed command run for real.

Why: every other test imports the checkout (an editable install or ``PYTHONPATH=src``), where a file
missing from the wheel (the migrations, ``py.typed``) or an import of a package no extra declares
cannot show. Here nothing of the checkout is on the path: only what the wheel and its declared
dependencies bring. Needs PyPI (or the index pip is configured with) for the dependencies; pip's
cache makes a rerun take about half as long as the first run.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from keyconnector import __version__
from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from tests.support.processes import stop_process, wait_for_port

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "keyconnector"
EXTRAS = "postgres,aws"

pytestmark = pytest.mark.timeout(900)


@dataclass(frozen=True)
class Installed:
    wheel: Path
    bin: Path
    env: dict[str, str]
    """The environment to run it in: nothing of the caller's Python set-up, no settings."""

    def run(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
        done = subprocess.run(
            [str(self.bin / "keyconnector"), *args],
            env=env or self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return Result(done.returncode, done.stdout, done.stderr)


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def _clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.lower().startswith(("keyconnectorsettings", "pythonpath", "virtual_env", "aspnetcore_urls"))
    }


def _index_unreachable() -> str | None:
    """Why the package index cannot be reached, or None when it answers (any HTTP answer counts)."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/").rstrip("/") + "/"
    cafile = os.environ.get("PIP_CERT")
    try:
        httpx.get(index, timeout=15, verify=ssl.create_default_context(cafile=cafile))
    except httpx.HTTPError as exc:
        return f"{index} cannot be reached ({type(exc).__name__}: {exc})"
    return None


def _pip(python: Path | str, *args: str, cwd: Path) -> None:
    done = subprocess.run(
        [str(python), "-m", "pip", *args],
        env=_clean_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        reason = _index_unreachable()
        if reason is not None:
            pytest.skip(f"the wheel's dependencies cannot be installed: {reason}")
        pytest.fail(f"pip {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """One build and one install for the whole test run: under pytest-xdist every worker process has
    its own session, so the first one to get here builds under a lock in the run's shared temporary
    folder and the others wait for it and use the same virtualenv (three builds cost a minute and a
    half of CPU on two cores)."""
    shared = tmp_path_factory.getbasetemp().parent / "wheel"
    shared.mkdir(exist_ok=True)
    with (shared / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (shared / "installed").exists():
                _build_and_install(shared)
                (shared / "installed").write_text(str(time.monotonic()))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    (wheel,) = (shared / "dist").glob("keyconnector-*.whl")
    yield Installed(wheel, shared / "venv" / "bin", _clean_env())


def _build_and_install(root: Path) -> None:
    began = time.monotonic()
    # What the image's build context holds (.dockerignore), copied: building in the checkout would
    # leave build/ and *.egg-info there, and a stray file in it could hide a missing package-data rule.
    tree = root / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    shutil.copytree(
        REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    )
    dist = root / "dist"
    _pip(sys.executable, "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist), str(tree), cwd=root)
    (wheel,) = dist.glob("keyconnector-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=_clean_env())
    # --no-compile: byte-compiling botocore's thousands of modules is most of an install's time, and
    # changes nothing that is tested here.
    _pip(venv / "bin" / "python", "install", "--quiet", "--no-compile", f"{wheel}[{EXTRAS}]", cwd=root)
    print(f"wheel built and installed with [{EXTRAS}] in {time.monotonic() - began:.0f}s", file=sys.stderr)


def test_the_wheel_holds_the_package_data_and_declares_the_extras(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = archive.read(metadata).decode()
    assert "keyconnector/py.typed" in names
    migrations = PACKAGE / "storage" / "sql" / "migrations"
    scripts = {
        path.relative_to(PACKAGE.parent).as_posix()
        for path in migrations.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert any("/versions/v0001" in name for name in scripts)  # the real migrations, found
    assert scripts <= names, sorted(scripts - names)
    assert not any(name.startswith(("tests/", "src/")) for name in names)
    assert f"Version: {__version__}" in meta
    assert "License-Expression: AGPL-3.0-or-later" in meta
    for extra in ("postgres", "aws", "gcp", "pkcs11", "all"):
        assert f"Provides-Extra: {extra}" in meta


def test_the_installed_command_answers_version_and_help(installed: Installed) -> None:
    shown = installed.run("--version")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"keyconnector {__version__}" and len(lines) == 4, shown.stdout
    assert lines[1].startswith("commit ") and lines[2].startswith("Python ") and "OpenSSL" in lines[3]
    helped = installed.run("--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("serve", "init", "check"):
        assert command in helped.stdout
    # The installed module, not the checkout's.
    where = subprocess.run(
        [str(installed.bin / "python"), "-c", "import keyconnector; print(keyconnector.__file__)"],
        env=installed.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(installed.bin.parent) in where and str(REPO) not in where


def _ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> httpx.Response:
    """The first 200 from ``url`` (a worker may still be starting when the port is open)."""
    deadline = time.monotonic() + timeout
    answer: httpx.Response | None = None
    while time.monotonic() < deadline and process.poll() is None:
        try:
            answer = httpx.get(url, timeout=10)
            if answer.status_code == 200:
                return answer
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not ready ({answer.text if answer else 'no answer'}):\n{log.read_text()}")


def test_init_check_and_serve_from_the_wheel(installed: Installed, tmp_path: Path, issuer: DevIssuer) -> None:
    folder = tmp_path / "kc"
    made = installed.run(
        "init",
        str(folder),
        "--key-bits",
        "2048",
        "--identity-server-uri",
        issuer.url,
        "--web-vault-uri",
        "https://vault.example.com",
    )
    assert made.returncode == 0, made.stderr
    env_file = str(folder / "keyconnector.env")
    checked = installed.run("check", "--env-file", env_file)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # Serving creates the schema with the migrations the wheel carries.
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(installed.bin / "keyconnector"), "serve", "--env-file", env_file, "--port", str(port)],
            env=installed.env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_port("127.0.0.1", port, process, what="the installed keyconnector", log=log, timeout=90)
            ready = _ready(f"http://127.0.0.1:{port}/health/ready", process, log)
            checks = ready.json()["checks"]
            assert checks["database"] == "ok" and checks["dataKey"] == "ok", checks
        finally:
            stop_process(process)
    assert "schema revision" in log.read_text()


def test_the_installed_extras_work_and_a_missing_one_is_named(
    installed: Installed, tmp_path: Path, issuer: DevIssuer
) -> None:
    imported = subprocess.run(
        [
            str(installed.bin / "python"),
            "-c",
            "import keyconnector.storage.backends.postgresql, keyconnector.keypairs.awskms; "
            "import asyncpg, psycopg, boto3, botocore",
        ],
        env=installed.env,
        capture_output=True,
        text=True,
    )
    assert imported.returncode == 0, imported.stderr

    folder = tmp_path / "kc"
    made = installed.run(
        "init",
        str(folder),
        "--key-bits",
        "2048",
        "--identity-server-uri",
        issuer.url,
        "--web-vault-uri",
        "https://vault.example.com",
    )
    assert made.returncode == 0, made.stderr
    env_file = str(folder / "keyconnector.env")

    # The postgres and aws extras reach their drivers: the failures are about the (closed) ports,
    # not about a package.
    closed = free_port()
    drivers = dict(
        installed.env,
        keyConnectorSettings__database__provider="postgresql",
        keyConnectorSettings__database__postgreSqlConnectionString=(
            f"Host=127.0.0.1;Port={closed};Database=kc;Username=kc;Password=unused;Timeout=2"
        ),
        keyConnectorSettings__rsaKey__provider="awskms",
        keyConnectorSettings__rsaKey__awsKeyId="alias/keyconnector",
        keyConnectorSettings__rsaKey__awsRegion="us-east-1",
        keyConnectorSettings__rsaKey__awsEndpoint=f"http://127.0.0.1:{closed}",
        keyConnectorSettings__rsaKey__awsAccessKeyId="AKIAEXAMPLE",
        keyConnectorSettings__rsaKey__awsAccessKeySecret="unused",
    )
    checked = installed.run("check", "--env-file", env_file, env=drivers)
    lines = checked.stdout.splitlines()
    database = next(line for line in lines if line.startswith("FAIL database"))
    key_pair = next(line for line in lines if line.startswith("FAIL key pair"))
    assert f"127.0.0.1:{closed}" in database and "pip install" not in database, checked.stdout
    assert "awskms" in key_pair and "pip install" not in key_pair, checked.stdout

    # An extra that is not installed is named, with the command that installs it.
    gcp = dict(
        installed.env,
        keyConnectorSettings__rsaKey__provider="gcpkms",
        keyConnectorSettings__rsaKey__googleCloudProjectId="project",
        keyConnectorSettings__rsaKey__googleCloudLocationId="global",
        keyConnectorSettings__rsaKey__googleCloudKeyringId="ring",
        keyConnectorSettings__rsaKey__googleCloudKeyId="key",
        keyConnectorSettings__rsaKey__googleCloudKeyVersionId="1",
    )
    checked = installed.run("check", "--env-file", env_file, env=gcp)
    assert checked.returncode == 1
    assert re.search(
        r"^FAIL key pair: keyConnectorSettings__rsaKey__provider: the 'gcpkms' provider needs the Python "
        r"package '[\w.]+', which is not installed; install it with: pip install 'keyconnector\[gcp\]'$",
        checked.stdout,
        re.MULTILINE,
    ), checked.stdout
    served = installed.run("serve", "--env-file", env_file, "--port", str(free_port()), env=gcp)
    assert served.returncode == 2
    assert "pip install 'keyconnector[gcp]'" in served.stderr
