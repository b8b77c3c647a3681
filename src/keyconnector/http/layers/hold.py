"""How long and how much one client may hold the service: the body deadline and the per-user cap.

granian bounds the connection itself (``runtime.server._http_options``): the time to send a request
head, which is also the idle time of a kept-alive connection, and one request at a time per
connection (HTTP/1.1 only). What it cannot see is done here, on the ``/user-keys`` paths only (the
endpoint table's ``LIMITED_PATHS``, handed in by ``app._layers``: the endpoint imports this module):

- **The body deadline** (``http.bodyTimeoutSeconds``). A PUT whose body trickles in a byte a second
  would otherwise hold its request, its place in the per-user cap and a worker's memory for as long
  as the client likes. The ``receive`` handed to the endpoint gives up at the deadline, counted from
  the request's arrival, with ``BodyTimeout``; the endpoint answers 408, closes the connection and
  writes nothing. Only POST and PUT get it: a GET, the storm's hot path, pays nothing, and once the
  body is complete ``receive`` is the server's own again (Starlette waits on it for a disconnect).
- **The per-user cap** (``http.maxRequestsInFlightPerUser``). Many connections under one token (a
  stolen one, or a client in a retry loop) could each hold a slow request. The user is known only
  once the token is checked, so the endpoint asks ``enter`` right then, before reading the body,
  and this layer gives the place back when the request ends, however it ends (answer, error, or a
  client that went away). Counted per worker process, like the rate limits, and for the same reason:
  no shared store on the request path.

``asyncio.timeout_at`` arms a timer handle on the running task: no task is created per request.
"""

from __future__ import annotations

import asyncio
from uuid import UUID

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keyconnector.http.context import RequestContext, context_of
from keyconnector.runtime.settings import HttpSettings
from keyconnector.telemetry import metrics

BODY_METHODS = frozenset({"POST", "PUT"})
"""The methods whose body the endpoint reads (every other one is answered without reading it)."""


class BodyTimeout(Exception):
    """The request's body had not arrived by its deadline (raised by the ``receive`` of a POST or PUT)."""


class UserSlots:
    """Requests running per user in this worker, at most ``cap`` each. O(1), and bounded: a user's
    entry exists only while one of their requests runs."""

    __slots__ = ("_cap", "_running")

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._running: dict[UUID, int] = {}

    def take(self, user: UUID) -> bool:
        """A place for one more request of ``user``, or False when they already have ``cap`` running."""
        running = self._running.get(user, 0)
        if running >= self._cap:
            return False
        self._running[user] = running + 1
        return True

    def give_back(self, user: UUID) -> None:
        running = self._running.get(user, 0) - 1
        if running > 0:
            self._running[user] = running
        else:
            self._running.pop(user, None)

    def running(self, user: UUID) -> int:
        return self._running.get(user, 0)


def enter(context: RequestContext, user: UUID) -> bool:
    """Called by the endpoint once the token names ``user``: False means 429 (the cap is reached).

    True when no cap applies (it is off, or this path is not capped).
    """
    slots = context.slots
    if slots is None:
        return True
    if not slots.take(user):
        metrics.count_rejection("maxRequestsInFlightPerUser")
        return False
    context.holding = user
    return True


class _Deadline:
    """A ``receive`` that raises ``BodyTimeout`` when the body is not complete by ``deadline`` (the
    loop's clock), then, once the body is complete, is the server's ``receive`` unchanged."""

    __slots__ = ("_deadline", "_done", "_receive")

    def __init__(self, receive: Receive, deadline: float) -> None:
        self._receive = receive
        self._deadline = deadline
        self._done = False

    async def __call__(self) -> Message:
        if self._done:
            return await self._receive()
        try:
            async with asyncio.timeout_at(self._deadline):
                message = await self._receive()
        except TimeoutError:
            raise BodyTimeout from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self._done = True
        return message


class HoldLayer:
    """Puts the body deadline on POST and PUT and the per-user cap in the context, on ``/user-keys``."""

    def __init__(self, app: ASGIApp, settings: HttpSettings, paths: frozenset[str]) -> None:
        self.app = app
        self._paths = paths
        self._body_seconds = settings.body_timeout_seconds
        cap = settings.max_requests_in_flight_per_user
        self.slots = UserSlots(cap) if cap > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self._paths:
            await self.app(scope, receive, send)
            return
        context = context_of(scope)
        context.slots = self.slots
        if scope["method"] in BODY_METHODS:
            receive = _Deadline(receive, asyncio.get_running_loop().time() + self._body_seconds)
        try:
            await self.app(scope, receive, send)
        finally:
            if context.holding is not None and self.slots is not None:
                self.slots.give_back(context.holding)
                context.holding = None
