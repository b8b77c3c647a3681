"""Rate limits, failed-authentication throttling and trusted proxies, against real services.

The limits are set small (a few requests per minute) so that a handful of requests crosses them and
no test waits for a refill. Each test uses its own client addresses (through a trusted proxy's
X-Forwarded-For) or its own service, so the buckets of one test never touch another's.
"""

from __future__ import annotations

import base64
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from keyconnector.devtools.issuer import DevIssuer
from keyconnector.http.layers.ratelimit import (
    BucketStore,
    RateLimiter,
    TrustedProxies,
    bucket_key,
    client_address,
)
from keyconnector.runtime.settings import RateLimitSettings
from tests.conftest import Pfx, Service, base_env

PREFIX = "keyConnectorSettings__rateLimit__"
KEY = base64.b64encode(bytes(range(32))).decode()


def limits(**values: str) -> dict[str, str]:
    return {PREFIX + name: value for name, value in values.items()}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer, pfx: Pfx) -> Iterator[Service]:
    """127.0.0.1 is a trusted proxy: each test picks its client addresses with X-Forwarded-For."""
    folder = tmp_path_factory.mktemp("limited")
    env = base_env(issuer, pfx, folder / "kc.db") | limits(
        perUserPerMinute="2",
        perUserBurst="2",
        perAddressPerMinute="3",
        perAddressBurst="3",
        failedAuthPerAddressPerMinute="2",
        failedAuthBurst="2",
        trustedProxies="10.9.0.0/16, 127.0.0.1",
    )
    service = Service(env, folder / "service.log")
    service.database = folder / "kc.db"  # type: ignore[attr-defined]
    service.start()
    yield service
    service.stop()


def from_address(address: str, token: str | None = None) -> dict[str, str]:
    headers = {"X-Forwarded-For": address}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def assert_limited(response: httpx.Response, setting: str) -> None:
    assert response.status_code == 429, response.text
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    message = response.json()["message"]
    assert message.startswith("too many requests")
    assert f"keyConnectorSettings__rateLimit__{setting}" in message


def stored_record(database: Path, user: uuid.UUID) -> str:
    with sqlite3.connect(database) as connection:
        rows = connection.execute('SELECT "Key", "Id" FROM "UserKeys"').fetchall()
    matches = [key for key, row_id in rows if str(row_id).lower() == str(user).lower()]
    assert len(matches) == 1
    return str(matches[0])


# -- through the real service ------------------------------------------------------------------------


def test_per_user_limit_refuses_the_third_request_and_spares_other_users(
    limited: Service, issuer: DevIssuer
) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    alice_token, bob_token = issuer.mint(alice), issuer.mint(bob)
    with limited.client() as client:
        # Each request from its own address, so that only the per-user limit can refuse.
        created = client.post("/user-keys", json={"key": KEY}, headers=from_address("10.1.0.1", alice_token))
        assert created.status_code == 200, created.text
        first = client.get("/user-keys", headers=from_address("10.1.0.2", alice_token))
        assert first.status_code == 200 and first.json()["key"] == KEY
        third = client.get("/user-keys", headers=from_address("10.1.0.3", alice_token))
        assert_limited(third, "perUserPerMinute")
        assert "key" not in third.json()
        assert third.headers.get("x-request-id")
        other = client.get("/user-keys", headers=from_address("10.1.0.4", bob_token))
        assert other.status_code == 404, other.text


def test_a_refused_write_writes_nothing(limited: Service, issuer: DevIssuer) -> None:
    user = uuid.uuid4()
    token = issuer.mint(user)
    database: Path = limited.database  # type: ignore[attr-defined]
    with limited.client() as client:
        assert client.post(
            "/user-keys", json={"key": KEY}, headers=from_address("10.2.0.1", token)
        ).is_success
        before = stored_record(database, user)
        assert client.get("/user-keys", headers=from_address("10.2.0.2", token)).status_code == 200
        other_key = base64.b64encode(b"\x07" * 32).decode()
        refused = client.put("/user-keys", json={"key": other_key}, headers=from_address("10.2.0.3", token))
        assert_limited(refused, "perUserPerMinute")
    assert stored_record(database, user) == before


def test_per_address_limit_uses_the_forwarded_address_from_a_trusted_proxy(
    limited: Service, issuer: DevIssuer
) -> None:
    """The address's request bucket (burst 3) refuses, once spent, only tokens that do not verify."""
    with limited.client() as client:
        for _ in range(4):
            ok = client.get("/user-keys", headers=from_address("198.51.100.1", issuer.mint(uuid.uuid4())))
            assert ok.status_code == 404, ok.text  # verified: never refused by a per-address limit
        refused = client.get("/user-keys", headers=from_address("198.51.100.1", "forged.token.a"))
        assert_limited(refused, "perAddressPerMinute")
        # Whatever the client writes to the left of the proxy's entry is not believed.
        spoofed = from_address("203.0.113.77, 198.51.100.1", "forged.token.b")
        assert_limited(client.get("/user-keys", headers=spoofed), "perAddressPerMinute")
        # A chain of trusted proxies (10.9.x.x) is skipped from the right.
        chained = from_address("198.51.100.1, 10.9.3.4", "forged.token.c")
        assert_limited(client.get("/user-keys", headers=chained), "perAddressPerMinute")
        other = client.get("/user-keys", headers=from_address("198.51.100.2", "forged.token.d"))
        assert other.status_code == 401, other.text


def test_a_flood_of_bad_tokens_throttles_that_address_only(limited: Service, issuer: DevIssuer) -> None:
    with limited.client() as client:
        for number in range(3):
            bad = client.get("/user-keys", headers=from_address(f"192.0.2.{10 + number}", "not-a-token"))
            assert bad.status_code == 401
        # Two failures from one address empty its failed-auth bucket (burst 2) while its per-address
        # bucket (burst 3) still has a token: the refusal below can only come from the failures.
        for _ in range(2):
            assert (
                client.get("/user-keys", headers=from_address("192.0.2.99", "forged.token.x")).status_code
                == 401
            )
        still_bad = client.get("/user-keys", headers=from_address("192.0.2.99", "forged.token.y"))
        assert_limited(still_bad, "failedAuthPerAddressPerMinute")
        # A token that verifies is served all the same: the failures were someone else's.
        good = issuer.mint(uuid.uuid4())
        served = client.get("/user-keys", headers=from_address("192.0.2.99", good))
        assert served.status_code == 404, served.text
        elsewhere = client.get("/user-keys", headers=from_address("192.0.2.100", "forged.token.z"))
        assert elsewhere.status_code == 401, elsewhere.text


def test_health_endpoints_are_never_limited(limited: Service) -> None:
    headers = from_address("192.0.2.200", "forged.token.z")
    with limited.client() as client:
        for _ in range(4):
            client.get("/user-keys", headers=headers)
        assert client.get("/user-keys", headers=headers).status_code == 429
        for _ in range(10):
            for path in ("/alive", "/now", "/health", "/health/live", "/health/ready"):
                assert client.get(path, headers=headers).status_code == 200, path


def test_forwarded_header_is_ignored_without_trusted_proxies(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    env = base_env(issuer, pfx, tmp_path / "kc.db") | limits(
        perAddressPerMinute="2", perAddressBurst="2", perUserPerMinute="0", failedAuthPerAddressPerMinute="0"
    )
    service = start_service(env)
    with service.client() as client:
        responses = [
            client.get("/user-keys", headers=from_address(f"198.51.100.{n}", token))
            for n, token in (
                (1, issuer.mint(uuid.uuid4())),
                (2, issuer.mint(uuid.uuid4())),
                (3, "forged.x.y"),
            )
        ]
    assert [r.status_code for r in responses] == [404, 404, 429]
    assert_limited(responses[2], "perAddressPerMinute")


# -- the parts on their own --------------------------------------------------------------------------


def test_bucket_refills_at_its_rate_and_says_when() -> None:
    store = BucketStore(per_minute=60, burst=2)
    assert store.take("a", 100.0) == 0.0
    assert store.take("a", 100.0) == 0.0
    assert store.take("a", 100.0) == pytest.approx(1.0)
    assert store.take("a", 100.5) == pytest.approx(0.5)
    assert store.take("a", 101.0) == 0.0
    assert store.peek("a", 101.0) == pytest.approx(1.0)
    assert store.peek("new", 101.0) == 0.0 and len(store) == 1  # a peek stores nothing
    assert store.take("a", 1000.0) == 0.0 and store.take("a", 1000.0) == 0.0  # never above the burst
    assert store.take("a", 1000.0) > 0


def test_bucket_memory_is_bounded_under_address_cycling() -> None:
    store = BucketStore(per_minute=6000, burst=600, max_entries=1000)
    store.take("victim", 0.0)
    for number in range(200_000):
        store.take(f"10.{number >> 16}.{(number >> 8) & 255}.{number & 255}", 0.0)
        if number % 500 == 0:
            store.take("victim", 0.0)  # recently used: kept, with its state
        assert len(store) <= 1000
    for _ in range(600 - 1 - 400):
        store.take("victim", 0.0)
    assert store.take("victim", 0.0) > 0  # its bucket survived 200,000 other addresses


def test_limits_of_zero_are_off() -> None:
    limiter = RateLimiter(
        RateLimitSettings(perUserPerMinute=0, perAddressPerMinute=0, failedAuthPerAddressPerMinute=0)
    )
    assert not limiter.enabled
    for _ in range(1000):
        assert limiter.arrived("192.0.2.1") == 0.0
        assert limiter.for_user("someone") is None
        assert limiter.authentication_failed("192.0.2.1") is None


def scope(peer: str, *forwarded: str) -> dict[str, object]:
    return {"client": (peer, 5555), "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded]}


def test_client_address_reads_forwarded_for_from_the_right() -> None:
    trusted = TrustedProxies.parse("127.0.0.1, 10.0.0.0/8, 2001:db8::/32")
    assert client_address(scope("192.0.2.5", "198.51.100.1"), trusted) == "192.0.2.5"
    assert client_address(scope("192.0.2.5", "198.51.100.1"), None) == "192.0.2.5"
    assert client_address(scope("127.0.0.1"), trusted) == "127.0.0.1"
    assert client_address(scope("127.0.0.1", "1.1.1.1, 198.51.100.1, 10.2.3.4"), trusted) == "198.51.100.1"
    assert client_address(scope("127.0.0.1", "1.1.1.1", "198.51.100.1:4431"), trusted) == "198.51.100.1"
    assert client_address(scope("127.0.0.1", "[2001:db9::7]:443, 2001:db8::1"), trusted) == "2001:db9::7"
    assert client_address(scope("127.0.0.1", "10.1.1.1, 10.2.2.2"), trusted) == "10.1.1.1"
    assert client_address(scope("127.0.0.1", "198.51.100.1, garbage, 10.2.2.2"), trusted) == "10.2.2.2"
    assert client_address(scope("::ffff:127.0.0.1", "198.51.100.9"), trusted) == "198.51.100.9"


def test_a_bad_trusted_proxy_entry_is_named() -> None:
    from keyconnector.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="not-an-address"):
        TrustedProxies.parse("127.0.0.1, not-an-address")
    assert TrustedProxies.parse(" , ") is None


def test_only_failures_are_refused_and_ipv6_counts_per_64() -> None:
    limiter = RateLimiter(
        RateLimitSettings(
            perAddressPerMinute=60, perAddressBurst=2, failedAuthPerAddressPerMinute=60, failedAuthBurst=1
        )
    )
    assert bucket_key("192.0.2.1") == "192.0.2.1"
    assert bucket_key("2001:db8:1:2:aaaa::1") == bucket_key("2001:db8:1:2::ffff") == "2001:db8:1:2::/64"
    assert bucket_key("2001:db8:1:3::1") != bucket_key("2001:db8:1:2::1")
    # The request bucket (burst 2) spent by verified requests refuses nothing by itself...
    assert [limiter.arrived("2001:db8:1:2::1", now=0.0) for _ in range(2)] == [0.0, 0.0]
    wait = limiter.arrived("2001:db8:1:2::2", now=0.0)
    assert wait > 0
    # ... a failure within both budgets is a 401; the second failure of the /64 is a 429 ...
    refusal = limiter.authentication_failed("2001:db8:1:2::3", 0.0, now=0.0)
    assert refusal is None  # the failed-auth bucket still had its one token, the request bucket did too
    refusal = limiter.authentication_failed("2001:db8:1:2::3", 0.0, now=0.0)
    assert refusal is not None and "failedAuthPerAddressPerMinute" in refusal.message
    # ... and so is a failure that arrived over the request bucket, though its failed bucket is full.
    other = limiter.authentication_failed("2001:db8:1:3::3", wait, now=0.0)
    assert other is not None and "perAddressPerMinute" in other.message
    assert limiter.authentication_failed("2001:db8:1:3::3", 0.0, now=30.0) is None  # refilled
