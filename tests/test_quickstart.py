"""The README's quick start, from a clean clone: `make run` makes its data and serves.

(`make test` from a clean clone is what CI itself runs, on every submission.)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from keyconnector.devtools import free_port
from tests.support.processes import wait_until

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(400)
def test_make_run_from_a_clean_clone(tmp_path: Path) -> None:
    if not (REPO / ".git").exists() or shutil.which("make") is None:
        pytest.fail("the quick-start test needs the git checkout and make")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    # The working tree under test, not only what is committed: copy tracked files over the clone.
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    port = free_port()
    # Nothing of the caller's Python set-up: the clone's own virtualenv is what is under test (a
    # PYTHONPATH pointing at another checkout's src would also be seen by the clone's pip).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().startswith(("keyconnectorsettings", "virtual_env", "pythonpath"))
    }
    log = (tmp_path / "make-run.log").open("wb")
    process = subprocess.Popen(
        ["make", "run", f"PORT={port}"],
        cwd=clone,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 360
        answer = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/alive", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert answer is not None and answer.status_code == 200, (tmp_path / "make-run.log").read_text()[
            -3000:
        ]
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        # Serving, and honest about the identity server that `make run` points at but nobody runs
        # (`make demo` starts one): degraded, not unhealthy, so it stays in a load balancer.
        assert health.status_code == 200 and health.text == "Degraded"
        ready = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).json()
        assert ready["checks"]["database"] == "ok" and ready["checks"]["dataKey"] == "ok"
        assert ready["checks"]["identity"] != "ok"
        data = clone / "data"
        assert (data / "key.pfx").exists() and (data / "keyconnector.db").exists()
        assert (data / "key.pfx.password").stat().st_mode & 0o077 == 0
        # `make run` passed its development URLs to init explicitly (init alone writes placeholders).
        env_file = (data / "keyconnector.env").read_text()
        assert "keyConnectorSettings__identityServerUri=http://localhost:33656" in env_file
        assert "replace-me.invalid" not in env_file
        # The greeting: once, at INFO, saying where it points and what to do; and no WARNING about
        # the identity server nobody runs (the worker's outage line for this address is INFO).
        wait_until(
            lambda: "keyconnector.auth: identity server:" in (tmp_path / "make-run.log").read_text(),
            process,
            what="make run",
            log=tmp_path / "make-run.log",
            timeout=30,
            waiting_for="log the identity server's state",
        )
        text = (tmp_path / "make-run.log").read_text()
        greetings = [line for line in text.splitlines() if "the development identity URL" in line]
        assert len(greetings) == 1, text
        assert " INFO " in greetings[0]
        for words in ("make demo", "keyConnectorSettings__identityServerUri", "http://localhost:33656"):
            assert words in greetings[0]
        assert not re.search(r"WARNING\s+keyconnector\.auth", text), text
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        log.close()
