"""The failed-token throttle cannot lock out valid users, a proxy nobody listed is noticed, and
readiness tells the truth about the identity server: each against a running service.

Why through the TCP proxy: every connection then comes from one peer address (127.0.0.1, the proxy's),
which is what the service sees behind nginx without ``rateLimit__trustedProxies``: every user and the
attacker share one bucket.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Pfx, Service, base_env
from tests.support.tcpproxy import TcpProxy

PREFIX = "keyConnectorSettings__rateLimit__"
KEY = base64.b64encode(bytes(range(32))).decode()


def tight_limits() -> dict[str, str]:
    """Limits a handful of bad tokens crosses, so that the flood is over every per-address budget."""
    return {
        PREFIX + "perAddressPerMinute": "6",
        PREFIX + "perAddressBurst": "3",
        PREFIX + "failedAuthPerAddressPerMinute": "6",
        PREFIX + "failedAuthBurst": "2",
        PREFIX + "perUserPerMinute": "600",
        PREFIX + "perUserBurst": "20",
    }


def forged(issuer: DevIssuer) -> str:
    """A real token of the issuer's key with its signature altered: the expensive kind of bad token."""
    token = issuer.mint(uuid.uuid4())
    head, payload, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    return f"{head}.{payload}.{flipped}"


def test_a_flood_of_bad_tokens_through_a_proxy_locks_out_no_valid_user(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    service = start_service(base_env(issuer, pfx, tmp_path / "kc.db") | tight_limits())
    stop = threading.Event()
    flood_answers: Counter[int] = Counter()
    throttled = threading.Event()

    def flood() -> None:
        bad = [forged(issuer), "not-a-token", forged(issuer)]
        with httpx.Client(base_url=f"http://127.0.0.1:{proxy.port}", timeout=10) as client:
            number = 0
            while not stop.is_set():
                response = client.get("/user-keys", headers={"Authorization": f"Bearer {bad[number % 3]}"})
                flood_answers[response.status_code] += 1
                if response.status_code == 429:
                    throttled.set()
                number += 1

    def login(user: uuid.UUID) -> tuple[int, int, str]:
        headers = {"Authorization": f"Bearer {issuer.mint(user)}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{proxy.port}", timeout=10) as client:
            created = client.post("/user-keys", json={"key": KEY}, headers=headers)
            read = client.get("/user-keys", headers=headers)
        return created.status_code, read.status_code, read.text

    with TcpProxy(("127.0.0.1", service.port)) as proxy:
        proxy.up()
        flooders = [threading.Thread(target=flood, daemon=True) for _ in range(2)]
        for thread in flooders:
            thread.start()
        try:
            assert throttled.wait(30), f"the flood was never throttled: {dict(flood_answers)}"
            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(login, [uuid.uuid4() for _ in range(200)]))
        finally:
            stop.set()
            for thread in flooders:
                thread.join(15)
    failures = [result for result in results if result[:2] != (200, 200) or KEY not in result[2]]
    assert not failures, f"{len(failures)} of 200 logins failed, e.g. {failures[:3]}"
    # The flood itself was answered 401 and then throttled, never served.
    assert set(flood_answers) <= {401, 429} and flood_answers[429] > 0, dict(flood_answers)


def test_a_cached_valid_token_is_served_while_its_address_is_throttled(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    service = start_service(base_env(issuer, pfx, tmp_path / "kc.db") | tight_limits())
    user = uuid.uuid4()
    good = {"Authorization": f"Bearer {issuer.mint(user)}"}
    with service.client() as client:
        assert client.post("/user-keys", json={"key": KEY}, headers=good).status_code == 200
        answers = [
            client.get("/user-keys", headers={"Authorization": f"Bearer {forged(issuer)}"}).status_code
            for _ in range(6)
        ]
        assert answers[:2] == [401, 401] and answers[-1] == 429, answers
        refused = client.get("/user-keys", headers={"Authorization": f"Bearer {forged(issuer)}"})
        assert refused.status_code == 429 and "Retry-After" in refused.headers
        assert "keyConnectorSettings__rateLimit__" in refused.json()["message"]
        # A signed token the policy refuses verified too: its 403 is final, never turned into a 429.
        policy = client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(amr=['pwd'])}"})
        assert policy.status_code == 403, policy.text
        again = client.get("/user-keys", headers=good)  # cached: verified before
        fresh = client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(user)}"})
    assert again.status_code == 200 and again.json()["key"] == KEY, again.text
    assert fresh.status_code == 200 and fresh.json()["key"] == KEY, fresh.text


def test_ipv6_clients_share_a_bucket_per_64(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    """One host owns a whole /64 and can pick any address in it: a bucket per address would be none."""
    env = (
        base_env(issuer, pfx, tmp_path / "kc.db") | tight_limits() | {PREFIX + "trustedProxies": "127.0.0.1"}
    )
    service = start_service(env)

    def bad_from(address: str) -> int:
        headers = {"Authorization": f"Bearer {forged(issuer)}", "X-Forwarded-For": address}
        return client.get("/user-keys", headers=headers).status_code

    with service.client() as client:
        assert [bad_from(f"2001:db8:7:1::{n:x}") for n in (1, 2)] == [401, 401]
        assert bad_from("2001:db8:7:1:ffff:1:2:3") == 429  # same /64: the same bucket
        assert bad_from("2001:db8:7:2::1") == 401  # the next /64 is someone else
        assert [bad_from(f"192.0.2.{n}") for n in (1, 2, 3)] == [401, 401, 401]  # IPv4: per address


def test_forwarded_requests_from_an_untrusted_peer_are_reported_once(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    service = start_service(base_env(issuer, pfx, tmp_path / "kc.db") | tight_limits())
    with service.client() as client:
        before = client.get("/health/ready").json()
        assert before["checks"]["clientAddresses"] == "ok", before
        for _ in range(3):
            client.get("/user-keys", headers={"X-Forwarded-For": "198.51.100.7"})
        ready = client.get("/health/ready")
    assert ready.status_code == 200
    note = ready.json()["checks"]["clientAddresses"]
    assert "127.0.0.1" in note and "keyConnectorSettings__rateLimit__trustedProxies" in note, note
    lines = [line for line in service.logs().splitlines() if "rateLimit__trustedProxies" in line]
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0] and "127.0.0.1" in lines[0] and "198.51.100.7" not in lines[0]


def test_readiness_health_and_check_agree_while_the_identity_server_is_down(
    tmp_path: Path, issuer: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = base_env(issuer, pfx, tmp_path / "kc.db") | {"keyConnectorSettings__identityServerUri": down}
    del env[PREFIX + "perAddressPerMinute"]  # its default: check then warns about trustedProxies
    service = start_service(env)
    with service.client() as client:
        ready = client.get("/health/ready")
        health = client.get("/health")
        login = client.get("/user-keys", headers={"Authorization": f"Bearer {issuer.mint(uuid.uuid4())}"})
    assert login.status_code == 503
    assert ready.status_code == 200, ready.text  # kept in the load balancer: the outage is not ours
    body = ready.json()
    assert body["status"] == "degraded", body
    assert "127.0.0.1" in body["checks"]["identity"] and body["checks"]["identity"] != "ok", body
    assert (health.status_code, health.text) == (200, "Degraded")
    check = subprocess.run(
        [sys.executable, "-m", "keyconnector", "check"], env=env, capture_output=True, text=True, timeout=120
    )
    identity = [line for line in check.stdout.splitlines() if "identity server" in line]
    assert len(identity) == 1 and "degraded" in identity[0], check.stdout + check.stderr
    # The only failure is a dependency that cannot be reached: exit 3 (ExitCode.UNAVAILABLE).
    assert "503" in identity[0] and identity[0].startswith("FAIL") and check.returncode == 3
    assert "warn client addresses: keyConnectorSettings__rateLimit__trustedProxies is empty" in check.stdout
