"""Vaultwarden as the identity server (docs/compatibility.md section 6.7), against a running service.

Vaultwarden's tokens differ from Bitwarden's in everything a strict validator might lean on: the
discovery document is under ``<origin>/identity``, the issuer is ``"<origin>|login"`` (not a URL), the
header is ``{"typ":"JWT","alg":"RS256"}`` without ``kid``, and there is no ``iat``. The development
issuer's ``flavour="vaultwarden"`` publishes and mints exactly that, over real HTTP.

Without a ``kid`` the service cannot look the key up, so it tries the published keys that can verify
the token's algorithm, at most ``MAX_KEYS_WITHOUT_KID``: a key set with more fails closed, saying so.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from keyconnector.auth.jwks import MAX_KEYS_WITHOUT_KID
from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Pfx, Service, base_env

REFETCH_INTERVAL = 5.0
"""The validator's throttle between two fetches of the key set (``KeySetSource.refetch_interval``)."""


@pytest.fixture
def vaultwarden() -> Iterator[DevIssuer]:
    with DevIssuer(flavour="vaultwarden") as dev:
        yield dev


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def segment(token: str, index: int) -> dict[str, object]:
    raw = token.split(".")[index]
    decoded: dict[str, object] = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    return decoded


def serve(start_service: Callable[..., Service], issuer: DevIssuer, pfx: Pfx, tmp_path: Path) -> Service:
    return start_service(base_env(issuer, pfx, tmp_path / "kc.db"))


def test_the_development_issuer_speaks_vaultwarden(vaultwarden: DevIssuer) -> None:
    """The premise of every other test here: the tokens and documents have Vaultwarden's shape."""
    assert vaultwarden.url == vaultwarden.origin + "/identity"
    assert vaultwarden.issuer == vaultwarden.origin + "|login"
    discovery = httpx.get(vaultwarden.url + "/.well-known/openid-configuration").json()
    assert discovery["issuer"] == vaultwarden.issuer
    assert discovery["jwks_uri"] == vaultwarden.origin + "/identity/.well-known/jwks"
    keys = httpx.get(discovery["jwks_uri"]).json()["keys"]
    assert [k["kty"] for k in keys] == ["RSA"] and "kid" not in keys[0]
    token = vaultwarden.mint()
    assert segment(token, 0) == {"typ": "JWT", "alg": "RS256"}
    claims = segment(token, 1)
    assert "iat" not in claims and "jti" not in claims
    assert claims["amr"] == ["external"] and claims["scope"] == ["api", "offline_access"]


def test_a_user_enrols_and_reads_a_key_with_vaultwarden_tokens(
    tmp_path: Path, vaultwarden: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    service = serve(start_service, vaultwarden, pfx, tmp_path)
    user, key = uuid.uuid4(), new_key()
    with service.client() as client:
        headers = bearer(vaultwarden.mint(user))
        assert client.get("/user-keys", headers=headers).status_code == 404
        assert client.post("/user-keys", headers=headers, json={"key": key}).status_code == 200
        # a later token of the same user (a new login) reads it back; a password login too
        again = bearer(vaultwarden.mint(user, amr=["Application"]))
        response = client.get("/user-keys", headers=again)
    assert response.status_code == 200 and response.json() == {"key": key}

    check = subprocess.run(
        [sys.executable, "-m", "keyconnector", "check"],
        env=service.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    identity = [line for line in check.stdout.splitlines() if "identity server" in line]
    assert identity and identity[0].lstrip().startswith("ok"), check.stdout + check.stderr
    assert vaultwarden.issuer in identity[0]


def test_tokens_for_other_vaultwarden_purposes_are_refused(
    tmp_path: Path, vaultwarden: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    """Vaultwarden signs invitations, admin sessions, Send links... with the same key: only the
    ``|login`` issuer is an access token."""
    service = serve(start_service, vaultwarden, pfx, tmp_path)
    with service.client() as client:
        for purpose in ("admin", "invite", "send", "api.organization", "verifyemail"):
            token = vaultwarden.mint(issuer=f"{vaultwarden.origin}|{purpose}")
            response = client.get("/user-keys", headers=bearer(token))
            assert response.status_code == 401, (purpose, response.text)
            assert "issuer" in response.json()["message"]


def test_a_kidless_token_is_tried_against_each_published_key(
    tmp_path: Path, vaultwarden: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    """Several kid-less keys (an operator who replaced ``rsa_key.pem``, or a proxy merging key sets):
    a token signed by any one of them is accepted, one signed by none is not."""
    for _ in range(MAX_KEYS_WITHOUT_KID - 1):
        vaultwarden.rotate()
    assert len(vaultwarden.kids) == MAX_KEYS_WITHOUT_KID
    service = serve(start_service, vaultwarden, pfx, tmp_path)
    with service.client() as client:
        for kid in vaultwarden.kids:
            user, key = uuid.uuid4(), new_key()
            headers = bearer(vaultwarden.mint(user, kid=kid))
            response = client.post("/user-keys", headers=headers, json={"key": key})
            assert response.status_code == 200, response.text
            assert client.get("/user-keys", headers=headers).json() == {"key": key}
        forged = vaultwarden.mint(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
        refused = client.get("/user-keys", headers=bearer(forged))
    assert refused.status_code == 401
    message = refused.json()["message"]
    assert "signature" in message and str(MAX_KEYS_WITHOUT_KID) in message
    assert forged not in message and forged not in service.logs()


def test_more_keys_than_are_tried_without_a_kid_fail_closed(
    tmp_path: Path, vaultwarden: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    for _ in range(MAX_KEYS_WITHOUT_KID):
        vaultwarden.rotate()
    service = serve(start_service, vaultwarden, pfx, tmp_path)
    token = vaultwarden.mint()  # signed by a published key, but which one cannot be told cheaply
    with service.client() as client:
        response = client.get("/user-keys", headers=bearer(token))
    assert response.status_code == 401
    message = response.json()["message"]
    assert "'kid'" in message and f"{MAX_KEYS_WITHOUT_KID + 1} keys" in message
    assert f"at most {MAX_KEYS_WITHOUT_KID}" in message
    # said once when the key set loads, where the operator looks, with what to do about it
    logs = service.logs()
    assert "without a 'kid'" in logs and "identityServerUri" in logs
    assert token not in logs and token not in message


def test_a_replaced_vaultwarden_key_is_picked_up_and_the_old_one_stops(
    tmp_path: Path, vaultwarden: DevIssuer, pfx: Pfx, start_service: Callable[..., Service]
) -> None:
    """Vaultwarden's key has no kid to miss, so a token that no cached key verifies is what says the
    key set may have changed: it fetches again (throttled), and principals that the withdrawn key
    vouched for leave the token cache."""
    service = serve(start_service, vaultwarden, pfx, tmp_path)
    user, key = uuid.uuid4(), new_key()
    old_token = vaultwarden.mint(user)
    with service.client() as client:
        assert client.post("/user-keys", headers=bearer(old_token), json={"key": key}).status_code == 200
        assert client.get("/user-keys", headers=bearer(old_token)).status_code == 200  # now cached
        vaultwarden.rotate(keep_old=False)
        new_token = vaultwarden.mint(user)
        deadline = time.monotonic() + REFETCH_INTERVAL + 5
        while True:
            response = client.get("/user-keys", headers=bearer(new_token))
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert response.status_code == 200, response.text
        assert response.json() == {"key": key}
        stale = client.get("/user-keys", headers=bearer(old_token))
    assert stale.status_code == 401, stale.text
