"""Life cycle of the throwaway servers the tests run as child processes (emulators, databases, OpenBao).

Each runs in a session of its own (``start_new_session=True``) with its output in a log file, so that
stopping it reaches its children too and a failure to start can show what it said.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar


def read_log(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts connections on ``host:port`` now."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def wait_until(
    ready: Callable[[], bool],
    process: subprocess.Popen[bytes],
    *,
    what: str,
    log: Path,
    timeout: float,
    waiting_for: str,
    interval: float = 0.05,
) -> None:
    """Poll ``ready`` until it holds; fail with the log if ``process`` exits, or stop it after ``timeout``.

    ``what`` names the server and ``waiting_for`` what it did not do, in the error messages.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{read_log(log)}")
        if ready():
            return
        time.sleep(interval)
    stop_process(process)
    raise RuntimeError(f"{what} did not {waiting_for} in {timeout:.0f}s:\n{read_log(log)}")


def wait_for_port(
    host: str, port: int, process: subprocess.Popen[bytes], *, what: str, log: Path, timeout: float
) -> None:
    """Wait until ``process`` accepts connections on ``host:port`` (see :func:`wait_until`)."""
    wait_until(
        lambda: port_open(host, port),
        process,
        what=what,
        log=log,
        timeout=timeout,
        waiting_for=f"listen on {host}:{port}",
    )


def stop_process(
    process: subprocess.Popen[bytes] | None, sig: signal.Signals = signal.SIGTERM, timeout: float = 10
) -> None:
    """Send ``sig`` to the process's session; SIGKILL it if it has not exited after ``timeout``."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class Throwaway(Protocol):
    def start(self) -> object: ...

    def destroy(self) -> None: ...


ServerT = TypeVar("ServerT", bound=Throwaway)


def started(server: ServerT) -> Iterator[ServerT]:
    """Start ``server``, hand it out, and destroy it at the end: a fixture's ``yield from started(...)``."""
    try:
        server.start()
        yield server
    finally:
        server.destroy()


def kill_midway(
    command: list[str], env: dict[str, str], reached: Callable[[], bool], what: str, timeout: float = 30
) -> str:
    """Run ``command``, SIGKILL it as soon as ``reached()`` holds, and return what it printed.

    For the interrupted-and-re-run tests: the command must still be running when it is killed,
    otherwise the test would prove nothing about an interruption.
    """
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not reached():
            assert process.poll() is None, f"the command ended (exit {process.returncode}) before {what}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.03)
        os.kill(process.pid, signal.SIGKILL)
        output = process.communicate(timeout=30)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, output
    return output
