"""A small round-robin TCP load balancer with passive health checking, for the cluster tests.

It behaves like the balancer an operator puts in front of several ``keyconnector serve`` processes:

- each new client connection goes to the next backend in turn;
- a backend whose *connect* fails (refused, timed out) is marked down for ``down_seconds`` and the
  connection is tried on the next backend instead, so a dead process costs the client nothing;
- a connection that breaks *after* it reached a backend is not retried: the balancer cannot know
  whether the request it carried was applied, so it resets the client's connection and the client
  sees the failure. That is exactly the case the tests' clients must handle themselves.

It works at the TCP level (no HTTP parsing), so what it counts per backend is connections; with one
request per connection that is also requests. It runs on its own event loop in a daemon thread, so
the test's own client code (sync or async) is unaffected by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from keyconnector.devtools import free_port


@dataclass
class BackendStats:
    """What the balancer saw of one backend (read from the test thread; ints only, so no torn reads)."""

    address: tuple[str, int]
    connections: int = 0
    """Client connections forwarded after a successful connect."""
    connect_failures: int = 0
    """Connects that failed, each of which marked the backend down."""
    broken: int = 0
    """Forwarded connections that ended with an error on the backend's side (reset, not a clean close)."""
    down_until: float = 0.0
    connected_at: list[float] = field(default_factory=list)
    """``time.monotonic()`` of every successful connect, to tell traffic before and after an event."""

    def is_down(self, now: float) -> bool:
        return now < self.down_until


class RoundRobinProxy:
    """Listen on 127.0.0.1:``port`` and spread connections over ``backends`` (see the module docstring)."""

    def __init__(
        self,
        backends: Sequence[tuple[str, int]],
        *,
        port: int | None = None,
        down_seconds: float = 1.0,
        connect_timeout: float = 2.0,
    ) -> None:
        if not backends:
            raise ValueError("a balancer needs at least one backend")
        self.port = port or free_port()
        self.stats = [BackendStats(address) for address in backends]
        self.down_seconds = down_seconds
        self.connect_timeout = connect_timeout
        self.refused = 0
        """Client connections closed because every backend was down."""
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RoundRobinProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> RoundRobinProxy:
        """Start listening; returns once the port accepts connections."""
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, "127.0.0.1", self.port, backlog=256)
                )
            except BaseException as exc:  # reported to the starting thread below
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"roundrobin-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the round-robin proxy did not start listening in 10 s")
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop listening, reset every open connection and end the loop's thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            loop.stop()

        loop.call_soon_threadsafe(lambda: loop.create_task(shutdown()))
        thread.join(10)

    def connections(self) -> list[int]:
        """Forwarded connections per backend so far, in the order the backends were given."""
        return [backend.connections for backend in self.stats]

    def connections_since(self, moment: float) -> list[int]:
        """Forwarded connections per backend whose connect happened at or after ``moment`` (monotonic)."""
        return [sum(1 for at in list(backend.connected_at) if at >= moment) for backend in self.stats]

    # -- inside the loop's thread ------------------------------------------------------------------------

    def _candidates(self) -> list[BackendStats]:
        """Backends in round-robin order starting at the next one, the ones marked down left out."""
        count = len(self.stats)
        start, self._next = self._next, (self._next + 1) % count
        now = time.monotonic()
        ordered = [self.stats[(start + i) % count] for i in range(count)]
        return [backend for backend in ordered if not backend.is_down(now)]

    async def _connect(self) -> tuple[BackendStats, asyncio.StreamReader, asyncio.StreamWriter] | None:
        for backend in self._candidates():
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(*backend.address), self.connect_timeout
                )
            except (OSError, TimeoutError):
                backend.connect_failures += 1
                backend.down_until = time.monotonic() + self.down_seconds
                continue
            backend.connections += 1
            backend.connected_at.append(time.monotonic())
            return backend, reader, writer
        return None

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            chosen = await self._connect()
            if chosen is None:
                # Every backend is down: close, as a balancer with nothing to send to does.
                self.refused += 1
                _reset(client_writer)
                return
            backend, upstream_reader, upstream_writer = chosen
            await self._relay(backend, client_reader, client_writer, upstream_reader, upstream_writer)
        except asyncio.CancelledError:
            _reset(client_writer)
        finally:
            self._tasks.discard(task)

    async def _relay(
        self,
        backend: BackendStats,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
    ) -> None:
        """Copy both ways until the backend's side ends; never replay anything on another backend."""

        async def client_to_upstream() -> None:
            with contextlib.suppress(OSError):
                while data := await client_reader.read(65536):
                    upstream_writer.write(data)
                    await upstream_writer.drain()
                # The client is done sending (or left): pass the half-close on and let the answer come.
                if upstream_writer.can_write_eof():
                    upstream_writer.write_eof()

        forward = asyncio.create_task(client_to_upstream())
        failed = False
        try:
            while data := await upstream_reader.read(65536):
                client_writer.write(data)
                await client_writer.drain()
        except OSError:
            failed = True
        finally:
            forward.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await forward
            upstream_writer.transport.abort()
        if failed:
            backend.broken += 1
            _reset(client_writer)  # the client must see the break, not a clean end of a short answer
        else:
            with contextlib.suppress(OSError):
                client_writer.close()
                await client_writer.wait_closed()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Drop a connection at once (RST rather than FIN, where the platform allows)."""
    writer.transport.abort()
