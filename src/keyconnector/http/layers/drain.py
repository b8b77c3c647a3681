"""Graceful drain: requests already running finish, new ones get a fast 503, then the process exits.

An orchestrator stops an instance with SIGTERM (Kubernetes, systemd, ``docker stop``). Dropping the
connections of requests in flight there would fail logins mid-way; holding new requests until the
process dies would make them time out. So on SIGTERM the server's parent process (``server.run``)
marks the drain in a private folder shared with its workers; each worker notices within
``POLL_SECONDS``, answers every new request with 503, ``Retry-After: 1`` and ``Connection: close`` (a
load balancer or client retries elsewhere, and keep-alive connections move away), lets the requests it
is running finish, and then leaves a marker saying it is idle. The parent waits for every worker's
marker, or ``shutdown.drainSeconds``, and only then stops the workers.

The folder is the whole protocol (no signals to workers, no shared memory): a worker that is still
starting, or has just been respawned, cannot be killed by a signal it has no handler for yet, and a
stat every ``POLL_SECONDS`` costs nothing. Which paths answer during the drain is the endpoint
table's (``endpoints.Draining``): ``/health/live`` keeps answering (the process is alive: restarting it
now would cut the requests it is finishing); ``/health/ready`` answers 503 so that the instance leaves
the load balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from keyconnector.http.endpoints import ANSWERS_WHILE_DRAINING, UNREADY_WHILE_DRAINING

DRAIN_DIR_ENV = "KEYCONNECTOR_DRAIN_DIR"
"""Set by ``server.run`` for its workers: the folder holding the drain flag and the markers."""
FLAG = "draining"
POLL_SECONDS = 0.1

log = logging.getLogger("keyconnector.http")
_REFUSAL = json.dumps(
    {"message": "this instance is shutting down; send the request again (another instance will answer)"}
).encode()
_NOT_READY = b'{"status":"draining","checks":{}}'


def worker_marker(folder: Path, pid: int) -> Path:
    """Exists while worker ``pid`` is serving in this folder's server."""
    return folder / f"worker-{pid}"


def idle_marker(folder: Path, pid: int) -> Path:
    """Exists once worker ``pid`` is draining with no request left running."""
    return folder / f"idle-{pid}"


class DrainLayer:
    """Counts the requests running in this worker, refuses new ones once the drain has begun."""

    def __init__(self, app: ASGIApp, folder: str | None = None) -> None:
        self.app = app
        folder = folder if folder is not None else os.environ.get(DRAIN_DIR_ENV)
        self._folder = Path(folder) if folder else None
        self.draining = False
        self.in_flight = 0
        self._watcher: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining:
            if scope["path"] in ANSWERS_WHILE_DRAINING:
                await self.app(scope, receive, send)
            elif scope["path"] in UNREADY_WHILE_DRAINING:
                await self._respond(send, _NOT_READY)
            else:
                await self._respond(send, _REFUSAL, (b"retry-after", b"1"), (b"connection", b"close"))
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if self.draining and self.in_flight == 0:
                self._mark_idle()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._folder is not None and self._watcher is None:
            worker_marker(self._folder, os.getpid()).touch()
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self._folder))
        try:
            await self.app(scope, receive, send)
        finally:
            if self._watcher is not None:
                self._watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watcher
                self._watcher = None
            if self._folder is not None:
                with contextlib.suppress(OSError):
                    worker_marker(self._folder, os.getpid()).unlink()

    async def _watch(self, folder: Path) -> None:
        flag = folder / FLAG
        while not self.draining:
            await asyncio.sleep(POLL_SECONDS)
            if flag.exists():
                self.start()

    def start(self) -> None:
        """Begin the drain in this worker (the parent's flag, or a direct call)."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d request(s) still running, new ones get 503", self.in_flight)
        if self.in_flight == 0:
            self._mark_idle()

    def _mark_idle(self) -> None:
        if self._folder is not None:
            try:
                idle_marker(self._folder, os.getpid()).touch()
            except OSError as exc:  # the parent then waits for drainSeconds: slower, not wrong
                log.warning("cannot mark this worker idle in %s: %s", self._folder, exc)

    @staticmethod
    async def _respond(send: Send, body: bytes, *headers: tuple[bytes, bytes]) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
