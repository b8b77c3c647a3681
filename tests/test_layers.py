"""The layers around the routing (``keyconnector.http.layers``), in process: one request context,
composed in one place, and an audit trail that knows no HTTP."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from keyconnector.audit import AuditEntry, AuditTrail
from keyconnector.http.app import create_app
from keyconnector.http.context import RequestContext, context_of
from keyconnector.http.layers.access import AccessLayer
from keyconnector.http.layers.cors import CORSMiddleware
from keyconnector.http.layers.drain import DrainLayer
from keyconnector.http.layers.errors import ErrorLayer
from keyconnector.http.layers.hold import HoldLayer
from keyconnector.http.layers.ratelimit import RateLimiter, RateLimitLayer
from keyconnector.http.layers.request_id import RequestIdLayer
from keyconnector.http.services import ProxyNotice, ServiceHolder, Services
from keyconnector.runtime.settings import RateLimitSettings, Settings, load_settings

SOURCE = Path(__file__).resolve().parents[1] / "src" / "keyconnector"


def test_the_audit_package_knows_no_asgi() -> None:
    """The audit trail is an edge: it takes an AuditEntry, and never reads a request itself."""
    for path in sorted((SOURCE / "audit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] != "starlette", f"{path.relative_to(SOURCE)} imports {name}"
                assert not name.startswith("keyconnector.http"), f"{path.relative_to(SOURCE)} imports {name}"


def test_no_request_fact_travels_in_a_loose_scope_key() -> None:
    """Per-request facts live in the one RequestContext (``context_of``), not in scope keys."""
    marker = 'scope["' + "keyconnector."
    offenders = [
        str(path.relative_to(SOURCE))
        for path in sorted(SOURCE.rglob("*.py"))
        if marker in path.read_text() or 'scope.get("keyconnector.' in path.read_text()
    ]
    assert not offenders


def _settings(tmp_path: Path, **rate_limit: str) -> Settings:
    environ = {
        "keyConnectorSettings__identityServerUri": "https://identity.example",
        "keyConnectorSettings__database__provider": "json",
        "keyConnectorSettings__database__jsonFilePath": str(tmp_path / "keys.json"),
    }
    environ |= {f"keyConnectorSettings__rateLimit__{name}": value for name, value in rate_limit.items()}
    return load_settings(environ=environ).settings


def _layers(app: Any) -> list[type]:
    found = []
    while not isinstance(app, Starlette):
        found.append(type(app))
        app = app.app
    return found


def test_the_layers_are_composed_in_their_documented_order(tmp_path: Path) -> None:
    assert _layers(create_app(_settings(tmp_path))) == [
        RequestIdLayer,
        AccessLayer,
        ErrorLayer,
        RateLimitLayer,
        CORSMiddleware,
        DrainLayer,
        HoldLayer,
    ]
    # With every limit off there is nothing to refuse: no rate-limit layer on the request path.
    off = _settings(
        tmp_path, perAddressPerMinute="0", perUserPerMinute="0", failedAuthPerAddressPerMinute="0"
    )
    assert RateLimitLayer not in _layers(create_app(off))


class _Endpoint:
    """A stand-in for the routing: answers what the path asks, and keeps the context it saw."""

    def __init__(self) -> None:
        self.seen: list[RequestContext] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = context_of(scope)
        self.seen.append(context)
        if scope["path"] == "/boom":
            raise RuntimeError("a bug")
        status = 401 if scope["path"] == "/user-keys" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


class _Trail(AuditTrail):
    """An audit trail that keeps its entries (a sink is configured, so entries are made)."""

    def __init__(self) -> None:
        super().__init__([])
        self.entries: list[AuditEntry] = []

    @property
    def enabled(self) -> bool:
        return True

    def record(self, entry: AuditEntry) -> bool:
        self.entries.append(entry)
        return True


def _compose(endpoint: ASGIApp, trail: _Trail, limits: RateLimitSettings) -> ASGIApp:
    holder = ServiceHolder()
    holder.services = cast(Services, SimpleNamespace(audit=trail, proxy_notice=ProxyNotice()))
    limiter = RateLimiter(limits)
    return RequestIdLayer(
        AccessLayer(ErrorLayer(RateLimitLayer(endpoint, limiter, holder)), metrics=False), limiter.trusted
    )


def _get(app: ASGIApp, *requests: tuple[str, dict[str, str]]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, client=("192.0.2.9", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://kc") as client:
            return [await client.get(path, headers=headers) for path, headers in requests]

    return asyncio.run(run())


def test_one_context_per_request_with_its_id_address_and_normalised_path() -> None:
    endpoint, trail = _Endpoint(), _Trail()
    app = _compose(endpoint, trail, RateLimitSettings())
    first, second = _get(
        app, ("/alive//", {"X-Request-Id": "from-client.1"}), ("/alive", {"X-Request-Id": "a b"})
    )
    assert first.headers["x-request-id"] == "from-client.1"
    assert len(second.headers["x-request-id"]) == 16  # not safe to echo: a fresh one
    assert [context.path for context in endpoint.seen] == ["/alive", "/alive"]
    assert [context.address for context in endpoint.seen] == ["192.0.2.9", "192.0.2.9"]
    assert [context.status for context in endpoint.seen] == [200, 200]
    assert endpoint.seen[0] is not endpoint.seen[1]


def test_an_unhandled_error_is_a_500_with_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    app = _compose(_Endpoint(), _Trail(), RateLimitSettings())
    (answer,) = _get(app, ("/boom", {"X-Request-Id": "rid-500"}))
    assert answer.status_code == 500
    assert answer.json() == {"message": "internal error; the incident was logged"}
    assert answer.headers["x-request-id"] == "rid-500"
    assert "unhandled error in GET /boom" in caplog.text


def test_the_rate_limit_layer_refuses_nothing_and_tells_the_endpoint_what_the_address_spent() -> None:
    """Whether a spent address budget matters depends on the token (a verified one is never refused):
    only the endpoint knows, so the layer hands it the limiter and what the request bucket said."""
    endpoint, trail = _Endpoint(), _Trail()
    limits = RateLimitSettings.model_validate(
        {"perAddressPerMinute": 1, "perAddressBurst": 1, "failedAuthPerAddressPerMinute": 0}
    )
    first, second, health = _get(
        _compose(endpoint, trail, limits), ("/user-keys", {}), ("/user-keys", {}), ("/alive", {})
    )
    assert [first.status_code, second.status_code, health.status_code] == [401, 401, 200]
    assert [context.limiter is not None for context in endpoint.seen] == [True, True, False]
    assert endpoint.seen[0].address_wait == 0.0 and endpoint.seen[1].address_wait > 0
    assert trail.entries == []  # the layer audits nothing: the endpoint answers every 429


def test_a_proxy_nobody_listed_is_noticed_once(caplog: pytest.LogCaptureFixture) -> None:
    endpoint, trail = _Endpoint(), _Trail()
    holder = ServiceHolder()
    notice = ProxyNotice()
    holder.services = cast(Services, SimpleNamespace(audit=trail, proxy_notice=notice))
    limiter = RateLimiter(RateLimitSettings())
    app = RequestIdLayer(RateLimitLayer(endpoint, limiter, holder), limiter.trusted)
    _get(app, ("/user-keys", {}))
    assert notice.peer is None and notice.describe() == "ok"
    _get(app, *[("/user-keys", {"X-Forwarded-For": "198.51.100.1, forged"})] * 3)
    assert notice.peer == "192.0.2.9"
    assert "keyConnectorSettings__rateLimit__trustedProxies=192.0.2.9" in notice.describe()
    warnings = [record for record in caplog.records if "trustedProxies" in record.getMessage()]
    assert len(warnings) == 1 and "forged" not in warnings[0].getMessage()


def test_the_body_deadline_ends_with_the_body() -> None:
    """Once the body is complete, ``receive`` is the server's own: Starlette waits on it for a
    disconnect for as long as the response takes, which the body deadline must not cut short."""
    from keyconnector.http.layers.hold import BodyTimeout, _Deadline

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        messages: list[dict[str, Any]] = [
            {"type": "http.request", "body": b"{", "more_body": True},
            {"type": "http.request", "body": b"}", "more_body": False},
        ]

        async def server_receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(0.3)  # a disconnect, later than the deadline
            return {"type": "http.disconnect"}

        receive = _Deadline(server_receive, loop.time() + 0.1)
        assert (await receive())["more_body"] is True
        assert (await receive())["more_body"] is False
        assert (await receive())["type"] == "http.disconnect"

        async def never() -> dict[str, Any]:
            await asyncio.sleep(10)
            raise AssertionError("unreachable")

        stalled = _Deadline(never, loop.time() + 0.1)
        with pytest.raises(BodyTimeout):
            await stalled()

    asyncio.run(scenario())
