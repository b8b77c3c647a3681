"""No secret in any log, audit entry or error: a real service with every log on, driven through every path.

The service runs on PostgreSQL (so a database password sits in its connection string) with a PFX whose
password is known, debug level, JSON logs to a file and stderr, the access log, and the audit sinks on.
The scenario enrols, reads and replaces keys, sends bad, expired, early, foreign and forged tokens and
broken bodies, and takes the database away for a moment. Then every byte the service wrote (its
stderr and stdout, the log file, the audit file) and every response is searched for every secret, in
the forms a careless log line would use: raw, base64 (standard and URL-safe, with and without padding),
URL-encoded and hex. The one legitimate place for a key is the 200 answer to its own user's GET.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from keyconnector.devtools.issuer import DevIssuer
from keyconnector.keypairs.generate import self_signed_pfx
from tests.conftest import Pfx, Service, base_env
from tests.support.databases import PostgresServer


def forms(secret: bytes) -> set[bytes]:
    """The spellings under which ``secret`` could leak (fragments of 12 bytes or fewer are not secrets)."""
    text = secret.decode("utf-8", "replace")
    spelled = {
        secret,
        base64.b64encode(secret),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
        binascii.hexlify(secret),
        quote(text, safe="").encode(),
        quote(text).encode(),
        text.encode("unicode_escape"),
    }
    return {form for form in spelled if len(form) >= 12}


class Secrets:
    """Every secret of the scenario with its label, so that a finding says which one leaked and where."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []

    def add(self, label: str, secret: str | bytes) -> str | bytes:
        self.items.append((label, secret if isinstance(secret, bytes) else secret.encode()))
        return secret

    def add_token(self, label: str, token: str) -> str:
        self.add(label, token)
        # A truncated token in a log line is still a signature an attacker can use in a forged one.
        self.add(label + " (signature)", token.rsplit(".", 1)[1])
        return token

    def find_in(self, where: str, data: bytes, allowed: frozenset[bytes] = frozenset()) -> list[str]:
        found = []
        for label, secret in self.items:
            if secret in allowed:
                continue
            for form in forms(secret):
                if form in data:
                    found.append(f"{label} ({form[:12]!r}...) in {where}")
                    break
        return found


def test_no_secret_in_any_log_audit_entry_or_response(
    issuer: DevIssuer, running_postgresql: PostgresServer, tmp_path: Path, start_service: Any
) -> None:
    server = running_postgresql
    known = Secrets()
    known.add("database password", server.password)
    known.add("database password (random part)", server.password[6:])

    pfx_password = str(known.add("PFX password", "pfx-" + secrets.token_urlsafe(18)))
    pfx_folder = tmp_path / "pfx"
    pfx_folder.mkdir()
    pfx_path = pfx_folder / "key.pfx"
    pfx_path.write_bytes(self_signed_pfx(pfx_password, bits=2048))

    logs = tmp_path / "logs"
    logs.mkdir()
    env = base_env(issuer, Pfx(pfx_path, pfx_password), tmp_path / "unused.db")
    del env["keyConnectorSettings__database__sqliteConnectionString"]
    env.update(
        {
            "keyConnectorSettings__database__provider": "postgresql",
            "keyConnectorSettings__database__postgreSqlConnectionString": server.connection_string(
                server.create_database()
            ),
            "keyConnectorSettings__logging__level": "debug",
            "keyConnectorSettings__logging__format": "json",
            "keyConnectorSettings__logging__accessLog": "true",
            "keyConnectorSettings__logging__file": str(logs / "service.log"),
            "keyConnectorSettings__audit__file": str(logs / "audit.jsonl"),
            "keyConnectorSettings__audit__stdout": "true",
            # Throttling is not under test here, and a 429 would hide the paths behind it.
            "keyConnectorSettings__rateLimit__perUserPerMinute": "0",
            "keyConnectorSettings__rateLimit__perAddressPerMinute": "0",
            "keyConnectorSettings__rateLimit__failedAuthPerAddressPerMinute": "0",
        }
    )
    service: Service = start_service(env)

    responses: list[tuple[str, httpx.Response, frozenset[bytes]]] = []
    user, other, missing = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    first_key = known.add("first key", secrets.token_bytes(32))
    second_key = known.add("second key", secrets.token_bytes(32))
    other_key = known.add("other user's key", secrets.token_bytes(48))
    refused_key = known.add("refused key", secrets.token_bytes(32))
    assert isinstance(first_key, bytes) and isinstance(second_key, bytes)
    assert isinstance(other_key, bytes) and isinstance(refused_key, bytes)

    def bearer(label: str, token: str) -> dict[str, str]:
        return {"Authorization": "Bearer " + known.add_token(label, token)}

    def body(key: bytes) -> dict[str, str]:
        return {"key": base64.b64encode(key).decode()}

    now = int(time.time())
    with service.client() as client:

        def call(label: str, method: str, *, allowed: frozenset[bytes] = frozenset(), **kwargs: Any) -> int:
            response = client.request(method, kwargs.pop("path", "/user-keys"), **kwargs)
            responses.append((label, response, allowed))
            return response.status_code

        good = bearer("user's token", issuer.mint(user))
        assert call("enrol", "POST", headers=good, json=body(first_key)) == 200
        assert call("enrol again", "POST", headers=good, json=body(refused_key)) == 400
        assert call("read", "GET", headers=good, allowed=frozenset({first_key})) == 200
        assert call("replace", "PUT", headers=good, json=body(second_key)) == 200
        assert call("read replaced", "GET", headers=good, allowed=frozenset({second_key})) == 200
        other_auth = bearer("other user's token", issuer.mint(other))
        assert call("create by PUT", "PUT", headers=other_auth, json=body(other_key)) == 200
        assert (
            call("no key yet", "GET", headers=bearer("token of a user with no key", issuer.mint(missing)))
            == 404
        )

        refused = {
            "expired token": issuer.mint(user, issued_at=now - 7200, lifetime=600),
            "token valid in an hour": issuer.mint(user, issued_at=now + 3600, not_before=now + 3600),
            "token of another issuer": issuer.mint(user, issuer="https://evil.example.com"),
            "HS256 token": issuer.mint(user, alg="HS256", key=b"secret-hmac-key-of-the-attacker"),
            "token without amr": issuer.mint(user, amr=None),
            "token with a space-delimited scope": issuer.mint(user, scope="api offline_access"),
            "truncated token": issuer.mint(user)[:-20],
            "token with an unknown kid": issuer.mint(user, kid="F" * 32, key=b"x" * 32, alg="HS256"),
        }
        for label, token in refused.items():
            assert call(label, "GET", headers=bearer(label, token)) in (401, 403), label
            put = call(
                label + " (PUT)", "PUT", headers=bearer(label + " (PUT)", token), json=body(refused_key)
            )
            assert put in (401, 403), label
        # Upstream does not check the audience (docs/compatibility.md section 2): accepted, and still
        # never logged.
        audience = bearer("token with another audience", issuer.mint(user, extra_claims={"aud": "elsewhere"}))
        assert (
            call("token with another audience", "GET", headers=audience, allowed=frozenset({second_key}))
            == 200
        )
        call(
            "basic auth",
            "GET",
            headers={"Authorization": "Basic " + base64.b64encode(b"kc:" + pfx_password.encode()).decode()},
        )
        call("no auth", "GET")
        query_token = known.add_token("token in the query string", issuer.mint(user))
        call(
            "token in the query",
            "GET",
            path=f"/user-keys?access_token={query_token}",
            headers=good,
            allowed=frozenset({second_key}),
        )

        refused_b64 = base64.b64encode(refused_key).decode()
        broken_bodies: dict[str, dict[str, Any]] = {
            "invalid JSON": {
                "content": b'{"key": "' + refused_b64.encode() + b'",',
                "headers": {"Content-Type": "application/json"},
            },
            "not an object": {"json": [refused_b64]},
            "no key property": {"json": {"value": refused_b64}},
            "two key properties": {"json": {"key": refused_b64, "KEY": refused_b64}},
            "key not base64": {"json": {"key": refused_b64 + "!"}},
            "key not a string": {"json": {"key": list(refused_key)}},
            "key too long": {"json": {"key": base64.b64encode(refused_key * 40).decode()}},
            "wrong content type": {
                "content": refused_b64.encode(),
                "headers": {"Content-Type": "text/plain"},
            },
            "body too large": {"json": {"key": refused_b64, "pad": "x" * 70_000}},
        }
        other_headers = {"Authorization": other_auth["Authorization"]}
        for label, request in broken_bodies.items():
            headers = {**other_headers, **request.pop("headers", {})}
            status = call(label, "PUT", headers=headers, **request)
            assert status in (400, 413, 415), (label, status)

        server.stop()
        try:
            for attempt in range(3):
                outage = bearer(f"token during the outage {attempt}", issuer.mint(user))
                assert call("read during the outage", "GET", headers=outage) == 503
                assert call("write during the outage", "PUT", headers=outage, json=body(refused_key)) == 503
        finally:
            server.start()
        assert call("read after the outage", "GET", headers=good, allowed=frozenset({second_key})) == 200
    service.stop()

    written: dict[str, bytes] = {path.name: path.read_bytes() for path in logs.iterdir()}
    written["stdout and stderr"] = service.log_path.read_bytes()
    assert written["service.log"], "the log file stayed empty: the scan would prove nothing"
    assert b"/user-keys" in written["stdout and stderr"], "no access log line reached stderr"

    findings: list[str] = []
    for name, data in written.items():
        findings += known.find_in(name, data)
    for label, response, allowed in responses:
        raw = b"".join(k + b": " + v + b"\n" for k, v in response.headers.raw) + response.content
        findings += known.find_in(f"the response to '{label}' ({response.status_code})", raw, allowed)
    assert not findings, "secrets leaked:\n" + "\n".join(findings)
