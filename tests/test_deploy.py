"""The deployment artefacts: container image definition, entrypoint, compose file, Helm chart, systemd.

No container engine or cluster runs here, so each artefact is checked by the strongest thing that
does run: the entrypoint script is executed for real (it builds the CA bundle, starts ``keyconnector
serve``, passes arguments through, is replaced by the server so SIGTERM reaches it; its step-down from
root for Bitwarden's installer is in test_entrypoint.py); the Dockerfile
goes through hadolint; the chart is linted, rendered with helm and every document validated against
the Kubernetes schemas offline; the unit goes through ``systemd-analyze verify`` when there is one;
and the example env files are read by keyconnector's own settings loader.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.devtools.tls import local_tls_files
from keyconnector.keypairs.pkcs11 import default_library_candidates
from keyconnector.runtime.settings import load_settings, read_env_file
from tests.conftest import Pfx, base_env

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
HELM = VENV_BIN / "helm"
HADOLINT = VENV_BIN / "hadolint"
DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = REPO / "deploy" / "docker" / "entrypoint.sh"
HEALTHCHECK = REPO / "deploy" / "docker" / "healthcheck"
COMPOSE = REPO / "deploy" / "compose" / "compose.yaml"
COMPOSE_ENV = REPO / "deploy" / "compose" / "keyconnector.env.example"
CHART = REPO / "deploy" / "helm" / "keyconnector"
UNIT = REPO / "deploy" / "systemd" / "keyconnector.service"
UNIT_ENV = REPO / "deploy" / "systemd" / "keyconnector.env.example"
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SECRET_NAME = re.compile(r"(password|secret|token|pin|connectionstring)$", re.IGNORECASE)
DEFAULT_DRAIN_SECONDS = 20.0


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------------------------------
# Dockerfile


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", text)
    result = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def test_dockerfile_passes_hadolint_and_hadolint_does_catch_mistakes(tmp_path: Path) -> None:
    done = subprocess.run(
        [HADOLINT, "--failure-threshold", "warning", DOCKERFILE], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The same linter fails a Dockerfile with the usual mistakes, so the pass above means something.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nRUN cd /tmp && pip install requests\n")
    done = subprocess.run(
        [HADOLINT, "--failure-threshold", "warning", bad], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "DL3007" in done.stdout  # :latest


def test_dockerfile_has_the_upstream_layout_and_a_hardened_runtime() -> None:
    instructions = _instructions(DOCKERFILE.read_text())
    by_name: dict[str, list[str]] = {}
    for name, rest in instructions:
        by_name.setdefault(name, []).append(rest)

    # Multi-stage from one pinned base (a full x.y.z tag, never :latest).
    base = next(rest for name, rest in instructions if name == "ARG" and rest.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm", base), base
    assert by_name["FROM"] == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE}"]
    assert any('install ".[all]"' in rest for rest in by_name["RUN"])
    runtime_run = " ".join(by_name["RUN"][-1:])
    for package in ("tini", "opensc-pkcs11", "ca-certificates"):
        assert package in runtime_run

    # No USER: the image starts as root only for the entrypoint to step down to bitwarden.sh's
    # LOCAL_UID/LOCAL_GID as upstream's does (test_entrypoint.py runs that), with setpriv, which the
    # build checks is there. The fixed-id user the compose file and the chart run it as exists.
    assert "USER" not in by_name
    assert "setpriv --version" in " ".join(by_name["RUN"])
    args = dict(rest.split("=", 1) for name, rest in instructions if name == "ARG" and "=" in rest)
    assert args["KC_UID"].isdigit() and int(args["KC_UID"]) > 0
    assert any('useradd --uid "${KC_UID}"' in rest for rest in by_name["RUN"])

    assert by_name["EXPOSE"] == ["5000"]
    assert by_name["VOLUME"] == ["/etc/bitwarden"]
    assert by_name["STOPSIGNAL"] == ["SIGTERM"]
    env = " ".join(by_name["ENV"])
    assert "ASPNETCORE_URLS=http://+:5000" in env
    assert "PATH=/opt/keyconnector/bin:$PATH" in env
    assert "/usr/local/bin/keyconnector-healthcheck" in by_name["HEALTHCHECK"][0]
    # tini is PID 1 and hands SIGTERM to the entrypoint, which exec's the server.
    assert by_name["ENTRYPOINT"] == ['["/usr/bin/tini", "--", "/usr/local/bin/keyconnector-entrypoint"]']
    assert by_name["CMD"] == ['["serve"]']
    labels = " ".join(by_name["LABEL"])
    for label in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert f"org.opencontainers.image.{label}=" in labels
    # The commit, for `keyconnector --version` in an image without a git checkout: a build argument
    # of the runtime stage (an ARG is scoped to its stage) that becomes the variable version.py reads.
    from keyconnector.cli.version import COMMIT_ENV

    runtime_stage = instructions[[i for i, (name, _) in enumerate(instructions) if name == "FROM"][-1] :]
    assert ("ARG", "COMMIT=unknown") in runtime_stage
    assert f"{COMMIT_ENV}=$COMMIT" in " ".join(rest for name, rest in runtime_stage if name == "ENV")

    # Everything COPY takes from the context exists and is not excluded by .dockerignore.
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignore
    for rest in by_name["COPY"]:
        parts = [p for p in rest.split() if not p.startswith("--")]
        if "--from=builder" in rest:
            continue
        for source in parts[:-1]:
            assert (REPO / source).exists(), source
            top = source.split("/")[0]
            assert any(
                line.startswith("!") and (line[1:].rstrip("/") == top or source.startswith(line[1:]))
                for line in ignore
            ), f"{source} is excluded by .dockerignore"


def test_the_image_ships_opensc_where_the_opensc_provider_looks() -> None:
    """The image installs Debian's opensc-pkcs11, which puts the module in /usr/lib/<multiarch>/;
    the `opensc` provider must look there on both architectures the image is built for."""
    candidates = default_library_candidates("opensc")
    machine = os.uname().machine
    assert f"/usr/lib/{machine}-linux-gnu/opensc-pkcs11.so" in candidates
    listed = subprocess.run(["dpkg", "-L", "opensc-pkcs11"], capture_output=True, text=True)
    if listed.returncode == 0:  # the real Debian package on this host: its file is a candidate
        files = [line for line in listed.stdout.splitlines() if line.endswith("/opensc-pkcs11.so")]
        assert files and any(path in candidates for path in files), files


# --------------------------------------------------------------------------------------------------
# Entrypoint


def _entrypoint_env(base: dict[str, str], tmp_path: Path, ca_dir: Path) -> dict[str, str]:
    env = dict(base)
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        env.pop(name, None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["KEYCONNECTOR_CA_DIR"] = str(ca_dir)
    env["KEYCONNECTOR_CA_BUNDLE"] = str(tmp_path / "run" / "ca-bundle.pem")
    env["KEYCONNECTOR_SYSTEM_CA_BUNDLE"] = str(SYSTEM_BUNDLE)
    return env


# The image run as a user, as the compose file and the chart run it (user: / runAsUser: 1000), so the
# entrypoint steps down from nothing (that path, from root, is in test_entrypoint.py). The two
# capabilities only let that user reach what is root's on this machine and not in an image: the
# interpreter under /root and pytest's root-only temporary folders.
AS_IMAGE_USER = [
    "setpriv",
    "--reuid=1000",
    "--regid=1000",
    "--clear-groups",
    "--inh-caps=+dac_override,+dac_read_search",
    "--ambient-caps=+dac_override,+dac_read_search",
    "--",
]


def _run_entrypoint(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AS_IMAGE_USER, "bash", str(ENTRYPOINT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_entrypoint_builds_a_bundle_of_the_system_and_the_mounted_cas(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca-certificates"
    ca_dir.mkdir()
    tls = local_tls_files(tmp_path, "Corp Root CA")
    shutil.copy(tls.ca, ca_dir / "corp.crt")
    # A second CA in DER form, as Windows exports them: converted, not skipped.
    (tmp_path / "other").mkdir()
    other = local_tls_files(tmp_path / "other")
    der = x509.load_pem_x509_certificate(other.ca.read_bytes()).public_bytes(Encoding.DER)
    (ca_dir / "windows.crt").write_bytes(der)
    (ca_dir / "junk.crt").write_text("this is not a certificate\n")
    (ca_dir / "README.txt").write_text("not a .crt: not looked at\n")
    env = _entrypoint_env(dict(os.environ), tmp_path, ca_dir)
    probe = "import os; print(os.environ['SSL_CERT_FILE']); print(os.environ['REQUESTS_CA_BUNDLE'])"

    done = _run_entrypoint(["python", "-c", probe], env)

    assert done.returncode == 0, done.stderr
    bundle = Path(env["KEYCONNECTOR_CA_BUNDLE"])
    assert done.stdout.split() == [str(bundle), str(bundle)]
    text = bundle.read_text()
    assert text.startswith(SYSTEM_BUNDLE.read_text().rstrip("\n"))
    assert tls.ca.read_text() in text
    last = text[text.rindex("-----BEGIN CERTIFICATE-----") :].encode()
    assert x509.load_pem_x509_certificate(last).public_bytes(Encoding.DER) == der
    assert (
        text.count("-----BEGIN CERTIFICATE-----")
        == SYSTEM_BUNDLE.read_text().count("-----BEGIN CERTIFICATE-----") + 2
    )
    assert "junk.crt: not a PEM or DER certificate" in done.stderr
    assert "README.txt" not in done.stderr
    assert oct(bundle.stat().st_mode & 0o777) == oct(0o644)

    # The bundle makes Python's default trust (what every library uses) accept the private CA.
    with _tls_server(tls.server_context()) as port:
        check = f"""
import socket, ssl
context = ssl.create_default_context()
with socket.create_connection(("127.0.0.1", {port}), timeout=5) as raw:
    with context.wrap_socket(raw, server_hostname="localhost") as conn:
        print(conn.version())
"""
        trusted = _run_entrypoint(["python", "-c", check], env)
        assert trusted.returncode == 0, trusted.stderr
        without = dict(env, KEYCONNECTOR_CA_DIR=str(tmp_path / "missing"))
        untrusted = _run_entrypoint(["python", "-c", check], without)
        assert untrusted.returncode != 0
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr


def test_entrypoint_without_cas_changes_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "junk.crt").write_text("junk")
    env = _entrypoint_env(dict(os.environ), tmp_path, empty)
    done = _run_entrypoint(["python", "-c", "import os; print(os.environ.get('SSL_CERT_FILE', '-'))"], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "-"
    assert not Path(env["KEYCONNECTOR_CA_BUNDLE"]).exists()
    assert "junk.crt" in done.stderr


def test_entrypoint_reports_an_unwritable_bundle_path_and_still_starts(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    shutil.copy(local_tls_files(tmp_path).ca, ca_dir / "corp.crt")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = dict(_entrypoint_env(dict(os.environ), tmp_path, ca_dir), KEYCONNECTOR_CA_BUNDLE=f"{blocker}/x.pem")
    done = _run_entrypoint(["python", "-c", "import os; print(os.environ.get('SSL_CERT_FILE', '-'))"], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "-"
    assert "cannot write the CA bundle" in done.stderr and "KEYCONNECTOR_CA_BUNDLE" in done.stderr


class _tls_server:
    """A one-thread TLS listener on loopback that completes handshakes (enough to test trust)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        import threading

        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self._context = context
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            try:
                conn.settimeout(5)
                with self._context.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                conn.close()

    def __enter__(self) -> int:
        self._thread.start()
        port: int = self._sock.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def _session_members(sid: int) -> list[int]:
    """Processes of a session (the entrypoint runs in its own), to prove nothing outlives it."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


@pytest.fixture
def entrypoint_process() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_entrypoint_execs_the_server_which_stops_on_sigterm(
    tmp_path: Path,
    issuer: DevIssuer,
    pfx: Pfx,
    entrypoint_process: list[subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    env = _entrypoint_env(base_env(issuer, pfx, tmp_path / "kc.db"), tmp_path, tmp_path / "no-cas")
    env["ASPNETCORE_URLS"] = f"http://127.0.0.1:{port}"
    env["keyConnectorSettings__shutdown__drainSeconds"] = "1"
    log = tmp_path / "entrypoint.log"
    with open(log, "wb") as out:
        # No arguments: the image's CMD is `serve`, and so is the script's default.
        process = subprocess.Popen(
            [*AS_IMAGE_USER, "bash", str(ENTRYPOINT)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    entrypoint_process.append(process)

    def live() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    _wait_for(live, 30, "/health/live")
    # exec: the process we started is the server itself now, not a shell waiting for it.
    cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
    assert b"bash" not in Path(f"/proc/{process.pid}/comm").read_bytes()
    assert b"serve" in cmdline

    # The image's health check finds the port through ASPNETCORE_URLS, as the container does.
    check_env = {"PATH": env["PATH"], "ASPNETCORE_URLS": f"http://+:{port}"}
    _wait_for(
        lambda: subprocess.run([sys.executable, HEALTHCHECK], env=check_env, timeout=10).returncode == 0,
        30,
        "the health check to pass",
    )
    closed = {"PATH": env["PATH"], "ASPNETCORE_URLS": f"http://+:{free_port()}"}
    failed = subprocess.run(
        [sys.executable, HEALTHCHECK], env=closed, capture_output=True, text=True, timeout=10
    )
    assert failed.returncode == 1 and "healthcheck:" in failed.stderr

    # SIGTERM to that one process (what tini forwards) stops everything it started.
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0, log.read_text()
    _wait_for(lambda: not _session_members(process.pid), 10, "the workers to exit")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2)


def test_entrypoint_passes_arguments_and_the_bundle_makes_a_private_ca_identity_server_trusted(
    tmp_path: Path, pfx: Pfx
) -> None:
    """`check` through the entrypoint, against an HTTPS identity server under a private CA. The
    service's own caCertificatesDirectory points to an empty folder, so only the bundle the
    entrypoint exported (SSL_CERT_FILE) can make the server trusted."""
    with DevIssuer(tls=True) as tls_issuer:
        ca_dir = tmp_path / "ca-certificates"
        ca_dir.mkdir()
        shutil.copy(tls_issuer.ca_file, ca_dir / "identity-ca.crt")
        empty = tmp_path / "empty"
        empty.mkdir()
        env = _entrypoint_env(base_env(tls_issuer, pfx, tmp_path / "kc.db"), tmp_path, ca_dir)
        env["keyConnectorSettings__caCertificatesDirectory"] = str(empty)

        trusted = _run_entrypoint(["check"], env)
        assert trusted.returncode == 0, trusted.stdout + trusted.stderr
        assert re.search(r"^ok\s+identity server", trusted.stdout, re.MULTILINE), trusted.stdout

        untrusted = _run_entrypoint(["check"], dict(env, KEYCONNECTOR_CA_DIR=str(empty)))
        # The identity server is the only failure, and the auth layer reports an untrusted certificate
        # as unavailable (the service answers 503 until the CA is added): exit 3, as for any outage.
        assert untrusted.returncode == 3
        assert re.search(r"^FAIL identity server", untrusted.stdout, re.MULTILINE), untrusted.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--help"], "usage: keyconnector serve"),  # flags go to serve
        (["--version"], "keyconnector "),
        (["backup", "--help"], "usage: keyconnector backup"),  # other subcommands by name
        (["echo", "plain command"], "plain command"),  # a command on PATH runs as is
    ],
)
def test_entrypoint_passes_arguments_through(tmp_path: Path, args: list[str], expected: str) -> None:
    env = _entrypoint_env(dict(os.environ), tmp_path, tmp_path / "none")
    done = _run_entrypoint(args, env)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout


# --------------------------------------------------------------------------------------------------
# Helm chart


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HELM_CACHE_HOME="/nonexistent-cache", HELM_CONFIG_HOME="/nonexistent-config")
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60, env=env)


def _render(tmp_path: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    args = ["template", "kc", str(CHART), "--namespace", "bitwarden"]
    if values is not None:
        values_file = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
        values_file.write_text(yaml.safe_dump(values))
        args += ["--values", str(values_file)]
    done = _helm(*args)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _render_error(tmp_path: Path, values: dict[str, Any]) -> str:
    values_file = tmp_path / "bad-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    done = _helm("template", "kc", str(CHART), "--values", str(values_file))
    assert done.returncode != 0, done.stdout
    return done.stderr


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, [doc["kind"] for doc in docs]
    return found[0]


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container["env"]}


VARIATIONS: dict[str, dict[str, Any] | None] = {
    "defaults": None,
    "postgres-existing-secret": {
        "database": {"provider": "postgresql", "existingSecret": "pg-conn", "existingSecretKey": "uri"},
        "pfx": {"existingSecret": "kc-key", "path": "/etc/bitwarden/keys/kc.pfx"},
    },
    "metrics-port": {"metrics": {"port": 9102}},
    "replicas-3": {"replicaCount": 3, "workers": 2},
    "extras": {
        "caCertificates": {"existingConfigMap": "corp-cas"},
        "tracing": {"enabled": True, "otlpEndpoint": "http://otel:4318"},
        "extraSettings": {"rateLimit__perUserPerMinute": 60},
        "extraEnv": [
            {
                "name": "keyConnectorSettings__rsaKey__vaultTransitToken",
                "valueFrom": {"secretKeyRef": {"name": "vault", "key": "token"}},
            }
        ],
        "shutdown": {"drainSeconds": 40, "terminationGracePeriodSeconds": 60},
    },
}


def test_helm_lint_passes_for_defaults_and_variations(tmp_path: Path) -> None:
    for name, values in VARIATIONS.items():
        args = ["lint", "--strict", str(CHART)]
        if values is not None:
            values_file = tmp_path / f"{name}.yaml"
            values_file.write_text(yaml.safe_dump(values))
            args += ["--values", str(values_file)]
        done = _helm(*args)
        assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}"


@pytest.mark.parametrize("variation", list(VARIATIONS))
def test_helm_chart_renders_valid_highly_available_hardened_manifests(tmp_path: Path, variation: str) -> None:
    values = VARIATIONS[variation] or {}
    docs = _render(tmp_path, VARIATIONS[variation])
    version = kubernetes_validate.latest_version()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    assert {doc["kind"] for doc in docs} >= {"Deployment", "Service", "PodDisruptionBudget", "ServiceAccount"}
    assert not [doc for doc in docs if doc["kind"] == "Secret"], "the chart must not carry secrets"

    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    container = _container(docs)
    env = _env(container)
    assert deployment["spec"]["replicas"] == values.get("replicaCount", 2) > 1

    # Probes on the health endpoints, by the named port.
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert container["ports"][0] == {"name": "http", "containerPort": 5000, "protocol": "TCP"}
    assert env["ASPNETCORE_URLS"]["value"] == "http://+:5000"
    assert env["keyConnectorSettings__logging__format"]["value"] == "json"

    # No secret value inline: every secret-looking setting comes from a Secret.
    for name, entry in env.items():
        if SECRET_NAME.search(name):
            assert "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}), name
    database = values.get("database", {})
    connection = env["keyConnectorSettings__database__postgreSqlConnectionString"]["valueFrom"][
        "secretKeyRef"
    ]
    assert connection == {
        "name": database.get("existingSecret", "kc-keyconnector-database"),
        "key": database.get("existingSecretKey", "connectionString"),
    }

    # The PFX comes from a Secret volume, at the path the settings name.
    pfx_values = values.get("pfx", {})
    pfx_path = pfx_values.get("path", "/etc/bitwarden/key.pfx")
    assert env["keyConnectorSettings__certificate__filesystemPath"]["value"] == pfx_path
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == pfx_path)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == pfx_values.get("existingSecret", "kc-keyconnector-pfx")
    assert mount["readOnly"] is True and mount["subPath"] == "key.pfx"

    # A disruption budget over exactly these pods.
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert pdb["spec"]["maxUnavailable"] == 1
    # Replicas spread over nodes.
    spread = pod["topologySpreadConstraints"]
    assert any(
        c["topologyKey"] == "kubernetes.io/hostname" and c["labelSelector"]["matchLabels"] == selector
        for c in spread
    )
    assert _one(docs, "Service")["spec"]["selector"] == selector

    # Non-root, read-only root filesystem (with a writable /tmp for the CA bundle), no capabilities.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
    assert pod["automountServiceAccountToken"] is False

    # Kubernetes waits longer than the pre-stop pause, the drain and the workers' close.
    drain = float(env["keyConnectorSettings__shutdown__drainSeconds"]["value"])
    assert drain == values.get("shutdown", {}).get("drainSeconds", DEFAULT_DRAIN_SECONDS)
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + 5

    assert container["args"] == ["serve", "--workers", str(values.get("workers", 1))]


def test_helm_metrics_on_a_separate_port(tmp_path: Path) -> None:
    docs = _render(tmp_path, VARIATIONS["metrics-port"])
    container = _container(docs)
    assert _env(container)["keyConnectorSettings__metrics__port"]["value"] == "9102"
    assert {"name": "metrics", "containerPort": 9102, "protocol": "TCP"} in container["ports"]
    ports = _one(docs, "Service")["spec"]["ports"]
    assert {p["name"]: p["targetPort"] for p in ports} == {"http": "http", "metrics": "metrics"}
    annotations = _one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9102"
    default = _container(_render(tmp_path))
    assert "keyConnectorSettings__metrics__port" not in _env(default)


def test_helm_extras_render_where_they_belong(tmp_path: Path) -> None:
    docs = _render(tmp_path, VARIATIONS["extras"])
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    container = _container(docs)
    env = _env(container)
    assert env["keyConnectorSettings__rateLimit__perUserPerMinute"]["value"] == "60"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel:4318"
    assert env["keyConnectorSettings__tracing__enabled"]["value"] == "true"
    assert pod["terminationGracePeriodSeconds"] == 60
    ca = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/bitwarden/ca-certificates")
    assert next(v for v in pod["volumes"] if v["name"] == ca["name"])["configMap"]["name"] == "corp-cas"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"database": {"provider": "sqlite"}}, "database.provider 'sqlite' cannot be shared"),
        ({"extraSettings": {"certificate__filesystemPassword": "x"}}, "extraSettings.certificate__"),
        ({"shutdown": {"drainSeconds": 30, "terminationGracePeriodSeconds": 30}}, "must exceed"),
    ],
)
def test_helm_refuses_unsafe_values_with_a_clear_message(
    tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    assert message in _render_error(tmp_path, values)


# --------------------------------------------------------------------------------------------------
# Compose


def _secret_files(tmp_path: Path) -> dict[str, str]:
    values = {}
    for name in ("postgres_connection_string", "pfx_password"):
        path = tmp_path / name
        path.write_text("Host=postgres;Password=p" if name.startswith("postgres") else "pfx-password")
        values[name] = str(path)
    return values


def test_compose_file_runs_keyconnector_after_a_healthy_postgres(tmp_path: Path) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"keyconnector", "postgres"}
    kc, pg = services["keyconnector"], services["postgres"]
    assert kc["depends_on"]["postgres"]["condition"] == "service_healthy"
    for service in (kc, pg):
        assert service["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}
    assert kc["healthcheck"]["test"] == ["CMD", "/usr/local/bin/keyconnector-healthcheck"]
    assert "5000:5000" in kc["ports"]
    assert any(v.endswith(":/etc/bitwarden") for v in kc["volumes"])
    assert kc["read_only"] is True and "/tmp" in kc["tmpfs"] and kc["cap_drop"] == ["ALL"]
    # Without capabilities a root start could not step down (the entrypoint refuses it): run as the
    # image's user from the start.
    assert kc["user"] == "1000:1000"
    assert kc["environment"]["keyConnectorSettings__logging__format"] == "json"

    # No password inline: secret-looking variables are ...File / _FILE paths to compose secrets.
    for service in (kc, pg):
        for name, value in service.get("environment", {}).items():
            if re.search(r"password|secret|connectionstring", name, re.IGNORECASE):
                assert name.lower().endswith("file"), name
                assert str(value).startswith("/run/secrets/"), name
                assert Path(value).name in service["secrets"]
    for secret in compose["secrets"].values():
        assert secret["file"].startswith("./secrets/")
    for name in read_env_file(COMPOSE_ENV):
        assert not SECRET_NAME.search(name), f"{name} belongs in a secret file"

    # Docker gives the drain time to finish before SIGKILL.
    env_file = read_env_file(COMPOSE_ENV)
    drain = float(env_file["keyConnectorSettings__shutdown__drainSeconds"])
    assert int(kc["stop_grace_period"].rstrip("s")) > drain + 5

    # The env example plus the compose environment are settings keyconnector knows, all of them.
    files = _secret_files(tmp_path)
    environ = {**env_file, **kc["environment"]}
    environ = {k: v.replace("/run/secrets/", str(tmp_path) + "/") for k, v in environ.items()}
    assert set(files.values()) <= set(environ.values())
    loaded = load_settings(environ)
    assert loaded.unknown == []
    assert loaded.settings.database.provider == "postgresql"
    assert loaded.settings.certificate.filesystem_path == "/etc/bitwarden/key.pfx"
    assert loaded.settings.certificate.filesystem_password is not None
    assert loaded.settings.logging.format == "json"

    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        work = tmp_path / "compose"
        shutil.copytree(COMPOSE.parent, work)
        shutil.copy(COMPOSE_ENV, work / "keyconnector.env")
        (work / "secrets").mkdir()
        for name in ("postgres_password", "postgres_connection_string", "pfx_password"):
            (work / "secrets" / name).write_text("x")
        done = subprocess.run(
            [docker, "compose", "-f", str(work / "compose.yaml"), "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------------------------------
# systemd


def _unit_directives(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> directive -> values (systemd allows a directive many times, configparser not)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_is_valid_and_gives_the_drain_its_time(tmp_path: Path) -> None:
    unit = _unit_directives(UNIT.read_text())
    service = unit["Service"]
    assert service["User"] == ["keyconnector"]
    assert service["ExecStart"][0].startswith("/opt/keyconnector/bin/keyconnector serve")
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["KillMode"] == ["mixed"]
    assert service["NoNewPrivileges"] == ["yes"] and service["ProtectSystem"] == ["strict"]
    assert service["ReadWritePaths"] == ["/etc/bitwarden"]
    assert "ASPNETCORE_URLS=http://0.0.0.0:5000" in service["Environment"]
    assert service["EnvironmentFile"] == ["/etc/keyconnector/keyconnector.env"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    env = read_env_file(UNIT_ENV)
    drain = float(env["keyConnectorSettings__shutdown__drainSeconds"])
    timeout = int(service["TimeoutStopSec"][0].rstrip("s"))
    assert timeout > drain + 5
    loaded = load_settings(env)
    assert loaded.unknown == []
    assert loaded.settings.database.provider == "sqlite"

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # verify wants ExecStart's binary to exist: point it at this checkout's keyconnector.
    copy = tmp_path / "keyconnector.service"
    copy.write_text(
        UNIT.read_text().replace("/opt/keyconnector/bin/keyconnector", str(VENV_BIN / "keyconnector"))
    )
    done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in done.stderr.splitlines() if "keyconnector.service" in line]
    assert done.returncode == 0 and not complaints, done.stderr
    # And verify does complain about a broken unit, so the silence above means something.
    broken = tmp_path / "broken.service"
    broken.write_text(copy.read_text().replace("TimeoutStopSec=35s", "TimeoutStopSec=soon\nKilMode=mixed"))
    done = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "KilMode" in done.stderr and "soon" in done.stderr
