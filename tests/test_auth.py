"""Token validation against a real (development) identity server over HTTP.

Every case maps to a line of the compatibility contract (docs/compatibility.md section 2): 401 for
anything that is not a valid token of this identity server, 403 for a valid token that fails the
"Application" policy, 503 (UnavailableError) while the keys cannot be had.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keyconnector.auth import AuthError, Principal, TokenValidator
from keyconnector.auth.jwks import MAX_KEYS_WITHOUT_KID, KeySetSource, parse_key_set
from keyconnector.devtools import DevIssuer
from keyconnector.errors import ConfigurationError, UnavailableError
from keyconnector.runtime.trust import Trust

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """The validator is built on asyncio primitives; pin the backend whatever conftest says."""
    return "asyncio"


@pytest.fixture(scope="module")
def issuer() -> Iterator[DevIssuer]:
    """Shared by tests that only mint: key generation is the slow part of a fresh issuer."""
    with DevIssuer() as dev:
        yield dev


@pytest.fixture
def fresh_issuer() -> Iterator[DevIssuer]:
    """For tests that rotate keys or take the issuer down."""
    with DevIssuer() as dev:
        yield dev


@pytest.fixture
async def validator(issuer: DevIssuer) -> AsyncIterator[TokenValidator]:
    v = TokenValidator(issuer.url)
    await v.refresh()
    yield v
    await v.aclose()


@pytest.fixture(scope="module")
def foreign_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def refused(v: TokenValidator, header: str | None, status: int, fragment: str = "") -> AuthError:
    with pytest.raises(AuthError) as info:
        await v.authenticate(header)
    err = info.value
    assert err.status == status, err.message
    assert fragment in err.message
    if header:
        token = header.partition(" ")[2]
        if len(token) > 8:
            assert token not in err.message and token not in str(err)
    return err


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> bool:
    """Poll ``condition`` for up to ``within`` seconds (background work has no event to wait on)."""
    for _ in range(int(within / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


def bearer(token: str) -> str:
    return "Bearer " + token


# -- the happy path ------------------------------------------------------------------------------


async def test_valid_token(issuer: DevIssuer, validator: TokenValidator) -> None:
    user = uuid.uuid4()
    before = time.time()
    principal = await validator.authenticate(bearer(issuer.mint(user)))
    assert isinstance(principal, Principal)
    assert principal.user_id == user
    assert principal.client_id == "web"
    assert before + 3590 <= principal.expires_at <= time.time() + 3610
    assert validator.ready
    assert validator.status().startswith(f"issuer {issuer.issuer}, 1 key")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_scheme_is_case_insensitive(issuer: DevIssuer, validator: TokenValidator, scheme: str) -> None:
    user = uuid.uuid4()
    principal = await validator.authenticate(f"{scheme} {issuer.mint(user)}")
    assert principal.user_id == user


async def test_trailing_slash_on_configured_uri(issuer: DevIssuer) -> None:
    v = TokenValidator(issuer.url + "/")
    try:
        user = uuid.uuid4()
        assert (await v.authenticate(bearer(issuer.mint(user)))).user_id == user
    finally:
        await v.aclose()


async def test_audience_is_ignored(issuer: DevIssuer, validator: TokenValidator) -> None:
    token = issuer.mint(extra_claims={"aud": ["some-other-api", "https://elsewhere"]})
    await validator.authenticate(bearer(token))


async def test_token_without_kid_uses_the_only_key(issuer: DevIssuer, validator: TokenValidator) -> None:
    await validator.authenticate(bearer(issuer.mint(header_overrides={"kid": None})))


async def test_cached_token_returns_the_same_principal(issuer: DevIssuer, validator: TokenValidator) -> None:
    header = bearer(issuer.mint())
    first = await validator.authenticate(header)
    fetches, hits = issuer.jwks_fetches, validator.cache_hits
    assert await validator.authenticate(header) == first
    assert await validator.authenticate("bearer  " + header[7:] + " ") == first
    assert validator.cache_hits == hits + 2
    assert issuer.jwks_fetches == fetches


# -- 401: no usable token ------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "   "])
async def test_missing_header(validator: TokenValidator, header: str | None) -> None:
    await refused(validator, header, 401)


@pytest.mark.parametrize("scheme", ["Basic", "Token", "Bearer:", "JWT", "Bearerx"])
async def test_not_bearer(issuer: DevIssuer, validator: TokenValidator, scheme: str) -> None:
    await refused(validator, f"{scheme} {issuer.mint()}", 401, "Bearer scheme")


async def test_bearer_without_token(validator: TokenValidator) -> None:
    await refused(validator, "Bearer", 401)
    await refused(validator, "Bearer    ", 401)


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b",
        "a.b.c",
        "a.b.c.d.e",
        "...",
        "eyJhbGciOiJSUzI1NiJ9.e30.",  # unsigned RS256
        "W10.e30.c2ln",  # header is a JSON array
        "bm90IGpzb24.e30.c2ln",  # header is not JSON
        "eyJhbGciOiJSUzI1NiIsImtpZCI6MX0.e30.c2ln",  # kid is a number
        "tökén.x.y",
        "x" * 20_000,
    ],
)
async def test_garbage_token(validator: TokenValidator, token: str) -> None:
    await refused(validator, bearer(token), 401)


async def test_tampered_payload(issuer: DevIssuer, validator: TokenValidator) -> None:
    header, payload, signature = issuer.mint().split(".")
    victim = issuer.mint(uuid.uuid4()).split(".")[1]
    await refused(validator, bearer(f"{header}.{victim}.{signature}"), 401, "signature is invalid")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    await refused(validator, bearer(f"{header}.{payload}.{flipped}"), 401, "signature is invalid")


async def test_foreign_key_with_the_same_kid(
    issuer: DevIssuer, validator: TokenValidator, foreign_key: rsa.RSAPrivateKey
) -> None:
    token = issuer.mint(key=foreign_key, kid=issuer.current_kid)
    await refused(validator, bearer(token), 401, "signature is invalid")


async def test_wrong_issuer(issuer: DevIssuer, validator: TokenValidator) -> None:
    await refused(validator, bearer(issuer.mint(issuer="https://evil.example")), 401, "issuer")
    await refused(validator, bearer(issuer.mint(extra_claims={"iss": None})), 401, "issuer")


async def test_issuer_differing_from_configured_uri() -> None:
    """Self-hosted: reached at http://identity:5000, issues http://identity; discovery decides."""
    with DevIssuer(issuer="http://identity") as dev:
        v = TokenValidator(dev.url)
        try:
            user = uuid.uuid4()
            assert (await v.authenticate(bearer(dev.mint(user)))).user_id == user
            assert "issuer http://identity," in v.status()
            await refused(v, bearer(dev.mint(issuer=dev.url)), 401, "issuer")
        finally:
            await v.aclose()


async def test_expired(issuer: DevIssuer, validator: TokenValidator) -> None:
    long_ago = int(time.time()) - 7200
    await refused(validator, bearer(issuer.mint(issued_at=long_ago, lifetime=3600)), 401, "expired")
    await refused(validator, bearer(issuer.mint(extra_claims={"exp": None})), 401, "expiry")
    await refused(validator, bearer(issuer.mint(extra_claims={"exp": "soon"})), 401, "expiry")


async def test_expired_within_skew_is_accepted(issuer: DevIssuer, validator: TokenValidator) -> None:
    issued = int(time.time()) - 3600 - 200  # expired 200 s ago, skew is 300 s
    await validator.authenticate(bearer(issuer.mint(issued_at=issued, lifetime=3600)))


async def test_skew_is_configurable(issuer: DevIssuer) -> None:
    v = TokenValidator(issuer.url, clock_skew=0)
    try:
        issued = int(time.time()) - 3600 - 5
        await refused(v, bearer(issuer.mint(issued_at=issued, lifetime=3600)), 401, "expired")
    finally:
        await v.aclose()


async def test_not_yet_valid(issuer: DevIssuer, validator: TokenValidator) -> None:
    now = int(time.time())
    await refused(validator, bearer(issuer.mint(not_before=now + 600)), 401, "not valid yet")
    await validator.authenticate(bearer(issuer.mint(not_before=now + 200)))  # within skew
    await refused(validator, bearer(issuer.mint(extra_claims={"nbf": "later"})), 401, "nbf")


async def test_alg_none(issuer: DevIssuer, validator: TokenValidator) -> None:
    await refused(validator, bearer(issuer.mint(alg="none")), 401, "algorithm")
    await refused(validator, bearer(issuer.mint(alg="none", header_overrides={"kid": None})), 401)
    # "none" spelled otherwise, with a real signature appended
    token = issuer.mint(header_overrides={"alg": "None"})
    await refused(validator, bearer(token), 401, "algorithm")


def _public_key_encodings(issuer: DevIssuer) -> list[bytes]:
    public = issuer.public_key()
    jwk = issuer.public_jwk()
    return [
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
        public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
        json.dumps(jwk).encode(),
        json.dumps(jwk, separators=(",", ":")).encode(),
        jwk["n"].encode(),
    ]


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hmac_with_the_public_key_as_secret(
    issuer: DevIssuer, validator: TokenValidator, alg: str
) -> None:
    for secret in _public_key_encodings(issuer):
        await refused(validator, bearer(issuer.mint(alg=alg, key=secret)), 401, "algorithm")
        token = issuer.mint(alg=alg, key=secret, header_overrides={"kid": None})
        await refused(validator, bearer(token), 401, "algorithm")


async def test_crit_header_is_refused(issuer: DevIssuer, validator: TokenValidator) -> None:
    token = issuer.mint(header_overrides={"crit": ["exp"]})
    await refused(validator, bearer(token), 401, "crit")
    token = issuer.mint(header_overrides={"crit": ["b64"], "b64": False})
    await refused(validator, bearer(token), 401, "crit")


async def test_alg_must_fit_the_key(fresh_issuer: DevIssuer, foreign_key: rsa.RSAPrivateKey) -> None:
    ec_kid = fresh_issuer.add_ec_key("P-256")
    v = TokenValidator(fresh_issuer.url)
    try:
        user = uuid.uuid4()
        assert (
            await v.authenticate(bearer(fresh_issuer.mint(user, alg="ES256", kid=ec_kid)))
        ).user_id == user
        # the RSA key's JWK says RS256: PS256 is not for it, and an RSA alg is not for the EC key
        await refused(v, bearer(fresh_issuer.mint(alg="PS256")), 401, "algorithm")
        await refused(
            v, bearer(fresh_issuer.mint(alg="RS256", kid=ec_kid, key=foreign_key)), 401, "algorithm"
        )
        # two keys published, one per key type: a token without kid is tried against the one that
        # accepts its algorithm, and an algorithm neither accepts finds no key
        kidless = {"kid": None}
        await v.authenticate(bearer(fresh_issuer.mint(header_overrides=kidless)))
        await v.authenticate(bearer(fresh_issuer.mint(alg="ES256", kid=ec_kid, header_overrides=kidless)))
        await refused(
            v, bearer(fresh_issuer.mint(alg="PS256", header_overrides=kidless)), 401, "signing algorithm"
        )
    finally:
        await v.aclose()


def test_key_set_parsing_follows_key_types() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = rsa_key.public_key().public_numbers()

    def b64(n: int) -> str:
        import base64

        return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()

    rsa_jwk = {"kty": "RSA", "kid": "r", "n": b64(numbers.n), "e": b64(numbers.e)}
    document = {
        "keys": [
            rsa_jwk,
            {"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
            {**rsa_jwk, "kid": "enc", "use": "enc"},
            {**rsa_jwk, "kid": "bad-alg", "alg": "HS256"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not an object",
        ]
    }
    key_set = parse_key_set(document, issuer="i", jwks_uri="u")
    assert list(key_set.keys) == ["r"]
    assert set(key_set.keys["r"].verifiers) == {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    assert key_set.count == 1
    assert key_set.without_kid["RS256"] == (key_set.keys["r"].verifiers["RS256"],)
    assert len(key_set.skipped) == 5
    with pytest.raises(ValueError, match="no usable signing key"):
        parse_key_set({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, issuer="i", jwks_uri="u")
    with pytest.raises(ValueError, match="no usable signing key"):
        parse_key_set({"keys": []}, issuer="i", jwks_uri="u")


def test_a_key_published_twice_is_tried_once_without_kid() -> None:
    """Two kids for one key (an identity server that lists its signing certificate twice) must not
    count twice towards the limit of keys tried for a token without kid."""
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_numbers()
    jwk = {"kty": "RSA", "n": _b64_uint(numbers.n), "e": _b64_uint(numbers.e)}
    copies = [{**jwk, "kid": str(i)} for i in range(MAX_KEYS_WITHOUT_KID + 2)] + [jwk]
    key_set = parse_key_set({"keys": copies}, issuer="i", jwks_uri="u")
    assert key_set.count == 1 and len(key_set.keys) == MAX_KEYS_WITHOUT_KID + 2
    assert len(key_set.without_kid["RS256"]) == 1
    assert key_set.kidless_overflow() is None


def _b64_uint(n: int) -> str:
    import base64

    return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


async def test_forged_kidless_tokens_refetch_at_most_once_per_interval() -> None:
    """Without kid a bad signature may mean a replaced key, so it may fetch again, but no more often
    than a made-up kid may: a flood of forged kid-less tokens cannot hammer the identity server."""
    interval = 0.6
    with DevIssuer(flavour="vaultwarden") as vaultwarden:
        v = TokenValidator(vaultwarden.url, refetch_interval=interval)
        try:
            await v.refresh()
            await asyncio.sleep(interval + 0.05)
            before = vaultwarden.jwks_fetches
            forged = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            tokens = [vaultwarden.mint(key=forged) for _ in range(40)]
            results = await asyncio.gather(
                *(v.authenticate(bearer(t)) for t in tokens), return_exceptions=True
            )
            assert all(isinstance(r, AuthError) and r.status == 401 for r in results), results
            assert all("signature does not match its only key" in r.message for r in results)  # type: ignore[union-attr]
            assert vaultwarden.jwks_fetches - before == 1
            assert (await v.authenticate(bearer(vaultwarden.mint()))).expires_at > time.time()
        finally:
            await v.aclose()


async def test_more_kidless_keys_than_are_tried_fail_closed_but_kid_tokens_still_work(
    fresh_issuer: DevIssuer,
) -> None:
    """The limit concerns tokens without kid only: Bitwarden's own tokens name their key."""
    for _ in range(MAX_KEYS_WITHOUT_KID):
        fresh_issuer.rotate()
    v = TokenValidator(fresh_issuer.url)
    try:
        await v.refresh()
        await v.authenticate(bearer(fresh_issuer.mint()))
        err = await refused(
            v,
            bearer(fresh_issuer.mint(header_overrides={"kid": None})),
            401,
            f"at most {MAX_KEYS_WITHOUT_KID}",
        )
        assert err.reason == "unknown_key"
        # every key has a kid: nothing to warn the operator about
        assert "without a 'kid'" not in v.status()
    finally:
        await v.aclose()


async def test_a_replaced_kidless_key_drops_the_tokens_it_vouched_for() -> None:
    with DevIssuer(flavour="vaultwarden") as vaultwarden:
        v = TokenValidator(vaultwarden.url, refetch_interval=0.05)
        try:
            await v.refresh()
            old = bearer(vaultwarden.mint())
            await v.authenticate(old)
            vaultwarden.rotate(keep_old=False)
            await asyncio.sleep(0.06)
            await v.authenticate(bearer(vaultwarden.mint()))  # fetches the new key set
            assert v.status().startswith(f"issuer {vaultwarden.issuer}, 1 key,")
            await refused(v, old, 401, "signature")
        finally:
            await v.aclose()


# -- 403: valid token, policy says no ------------------------------------------------------------

POLICY_CASES: list[tuple[Any, Any, int, str]] = [
    # scope, amr, expected status, message fragment
    (["api", "offline_access"], ["external"], 200, ""),
    (["api"], ["Application"], 200, ""),
    (["offline_access", "api"], ["pwd", "Application"], 200, ""),
    ("api offline_access", ["external"], 403, "'scope' is not a JSON array"),
    ("api", ["external"], 403, "'scope' is not a JSON array"),
    (None, ["external"], 403, "no 'scope'"),
    (["offline_access"], ["external"], 403, "lacks the 'api' scope"),
    ([], ["external"], 403, "lacks the 'api' scope"),
    (["API"], ["external"], 403, "lacks the 'api' scope"),
    (["api"], None, 403, "no authentication method"),
    (["api"], "external", 403, "not a JSON array"),
    (["api"], ["pwd"], 403, "neither 'Application' nor 'external'"),
    (["api"], ["application"], 403, "neither"),
    (["api"], [], 403, "neither"),
]


@pytest.mark.parametrize(("scope", "amr", "status", "fragment"), POLICY_CASES)
async def test_scope_and_amr_policy(
    issuer: DevIssuer, validator: TokenValidator, scope: Any, amr: Any, status: int, fragment: str
) -> None:
    token = issuer.mint(scope=scope, amr=amr)
    if status == 200:
        await validator.authenticate(bearer(token))
    else:
        await refused(validator, bearer(token), status, fragment)


@pytest.mark.parametrize(
    "sub", [None, "", "not-a-guid", "12345", 42, ["3f2504e0-4f89-11d3-9a0c-0305e82c3301"]]
)
async def test_sub_not_a_guid(issuer: DevIssuer, validator: TokenValidator, sub: Any) -> None:
    token = issuer.mint(extra_claims={"sub": sub} if sub is not None else {"sub": None})
    await refused(validator, bearer(token), 403, "'sub'")


async def test_sub_guid_spellings(issuer: DevIssuer, validator: TokenValidator) -> None:
    user = uuid.uuid4()
    for spelling in (str(user).upper(), str(user), "{" + str(user) + "}"):
        assert (await validator.authenticate(bearer(issuer.mint(spelling)))).user_id == user


async def test_policy_failures_are_not_cached(issuer: DevIssuer, validator: TokenValidator) -> None:
    header = bearer(issuer.mint(scope=["offline_access"]))
    await refused(validator, header, 403)
    await refused(validator, header, 403)


# -- key rotation and the refetch throttle ------------------------------------------------------


async def test_key_rotation_is_picked_up(fresh_issuer: DevIssuer) -> None:
    v = TokenValidator(fresh_issuer.url, refetch_interval=0.05)
    try:
        old = fresh_issuer.mint()
        await v.authenticate(bearer(old))
        await asyncio.sleep(0.06)
        new_kid = fresh_issuer.rotate()
        user = uuid.uuid4()
        assert (await v.authenticate(bearer(fresh_issuer.mint(user)))).user_id == user
        assert new_kid in v.status() or "2 keys" in v.status()
        await v.authenticate(bearer(old))  # old key still published

        # the old key is withdrawn: even its cached tokens stop working once the set is refetched
        fresh_issuer.rotate(keep_old=False)
        await v.refresh()
        await refused(v, bearer(old), 401, "does not publish")
    finally:
        await v.aclose()


async def test_unknown_kid_refetch_is_throttled(fresh_issuer: DevIssuer) -> None:
    interval = 0.6  # long enough that a slow machine finishes the burst inside it
    v = TokenValidator(fresh_issuer.url, refetch_interval=interval)
    try:
        await v.refresh()
        await asyncio.sleep(interval + 0.05)  # a refetch is allowed again
        before = fresh_issuer.jwks_fetches
        tokens = [fresh_issuer.mint(header_overrides={"kid": uuid.uuid4().hex.upper()}) for _ in range(100)]
        # fifty at once share one fetch, fifty more right after must not fetch at all
        results = await asyncio.gather(
            *(v.authenticate(bearer(t)) for t in tokens[:50]), return_exceptions=True
        )
        for token in tokens[50:]:
            await refused(v, bearer(token), 401, "does not publish")
        assert all(isinstance(r, AuthError) and r.status == 401 for r in results)
        assert fresh_issuer.jwks_fetches - before == 1

        # once the interval has passed, one more fetch is allowed (and only one)
        await asyncio.sleep(interval + 0.05)
        for token in tokens[:20]:
            await refused(v, bearer(token), 401)
        assert fresh_issuer.jwks_fetches - before == 2
        # valid tokens keep working throughout
        await v.authenticate(bearer(fresh_issuer.mint()))
    finally:
        await v.aclose()


async def test_bad_signatures_under_a_known_kid_refetch_at_most_once_per_interval(
    fresh_issuer: DevIssuer,
) -> None:
    """A bad signature under a known kid may mean the kid now names a new key (issue 15), so it is
    worth a refetch; a flood of forged signatures must still cost the identity server one fetch per
    interval, as unknown kids do."""
    interval = 0.6
    v = TokenValidator(fresh_issuer.url, refetch_interval=interval)
    try:
        await v.refresh()
        await asyncio.sleep(interval + 0.05)
        before = fresh_issuer.jwks_fetches
        foreign = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        tokens = [fresh_issuer.mint(key=foreign) for _ in range(60)]
        results = await asyncio.gather(
            *(v.authenticate(bearer(t)) for t in tokens[:30]), return_exceptions=True
        )
        for token in tokens[30:]:
            await refused(v, bearer(token), 401, "signature is invalid")
        assert all(isinstance(r, AuthError) and r.status == 401 for r in results), results
        assert fresh_issuer.jwks_fetches - before == 1
    finally:
        await v.aclose()


async def test_a_new_key_under_a_known_kid_is_picked_up_and_its_cached_tokens_dropped(
    fresh_issuer: DevIssuer,
) -> None:
    v = TokenValidator(fresh_issuer.url, refetch_interval=0.05)
    try:
        kid = fresh_issuer.current_kid
        old = fresh_issuer.mint()
        await v.authenticate(bearer(old))  # cached
        await asyncio.sleep(0.06)
        fresh_issuer.replace_key(kid, keep_old_as=kid + "-old")
        user = uuid.uuid4()
        assert (await v.authenticate(bearer(fresh_issuer.mint(user)))).user_id == user
        await refused(v, bearer(old), 401, "signature is invalid")
    finally:
        await v.aclose()


async def test_concurrent_callers_share_one_fetch(fresh_issuer: DevIssuer) -> None:
    """Right after a rotation, a burst of tokens with the new kid all wait for the same fetch."""
    interval = 0.2
    v = TokenValidator(fresh_issuer.url, refetch_interval=interval)
    try:
        await v.refresh()
        await asyncio.sleep(interval + 0.05)
        before = fresh_issuer.jwks_fetches
        fresh_issuer.rotate()
        users = [uuid.uuid4() for _ in range(30)]
        principals = await asyncio.gather(*(v.authenticate(bearer(fresh_issuer.mint(u))) for u in users))
        assert [p.user_id for p in principals] == users
        assert fresh_issuer.jwks_fetches - before == 1
    finally:
        await v.aclose()


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(fresh_issuer: DevIssuer) -> None:
    """A client hanging up mid-request must not abort the fetch other requests are waiting for."""
    fresh_issuer.set_delay(0.2)
    v = TokenValidator(fresh_issuer.url)
    try:
        first = asyncio.ensure_future(v.authenticate(bearer(fresh_issuer.mint())))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(v.authenticate(bearer(fresh_issuer.mint())))
        await asyncio.sleep(0.05)
        first.cancel()
        await second
        assert first.cancelled()
        assert fresh_issuer.jwks_fetches == 1
    finally:
        await v.aclose()


def test_https_identity_server_needs_an_https_key_set() -> None:
    source = KeySetSource("https://identity.example")
    document = {"issuer": "https://identity.example", "jwks_uri": "http://identity.example/jwks"}
    with pytest.raises(Exception, match="plain http"):
        source._read_discovery(document)
    document["jwks_uri"] = "https://identity.example/jwks"
    assert source._read_discovery(document) == ("https://identity.example", "https://identity.example/jwks")


# -- identity server outages --------------------------------------------------------------------


async def test_identity_server_down_at_start_then_recovers(fresh_issuer: DevIssuer) -> None:
    fresh_issuer.set_available(False)
    v = TokenValidator(fresh_issuer.url, refetch_interval=0.05)
    try:
        await v.start()
        token = fresh_issuer.mint()
        with pytest.raises(UnavailableError) as info:
            await v.authenticate(bearer(token))
        assert info.value.component == "identity server"
        assert "503" in info.value.problem
        assert info.value.retry_after >= 1
        assert not v.ready
        assert v.status().startswith("not ready")
        with pytest.raises(UnavailableError, match="503"):
            await v.refresh()
        # a bad header is still a 401, not a 503: no keys are needed to refuse it
        await refused(v, None, 401)

        fresh_issuer.set_available(True)
        await asyncio.sleep(0.06)
        user = uuid.uuid4()
        assert (await v.authenticate(bearer(fresh_issuer.mint(user)))).user_id == user
        assert v.ready
    finally:
        await v.aclose()


async def test_background_loading_recovers_without_traffic(fresh_issuer: DevIssuer) -> None:
    fresh_issuer.set_available(False)
    v = TokenValidator(fresh_issuer.url, refetch_interval=60)
    try:
        await v.start()
        await asyncio.sleep(0.2)
        assert not v.ready
        fresh_issuer.set_available(True)
        assert await eventually(lambda: v.ready)
        await v.authenticate(bearer(fresh_issuer.mint()))
    finally:
        await v.aclose()


async def test_unreachable_identity_server() -> None:
    with DevIssuer() as dev:
        url = dev.url
    v = TokenValidator(url, refetch_interval=0.01)
    try:
        with pytest.raises(UnavailableError) as info:
            await v.authenticate(bearer("a.b.c"))
        assert "cannot be fetched" in info.value.problem
        assert "/.well-known/openid-configuration" in info.value.problem
    finally:
        await v.aclose()


async def test_keys_kept_through_an_outage(fresh_issuer: DevIssuer) -> None:
    v = TokenValidator(fresh_issuer.url, refetch_interval=0.01)
    try:
        await v.refresh()
        fresh_issuer.set_available(False)
        with pytest.raises(UnavailableError):
            await v.refresh()
        assert v.ready
        assert "last refresh failed" in v.status()
        await v.authenticate(bearer(fresh_issuer.mint()))
    finally:
        await v.aclose()


async def test_key_set_is_refreshed_periodically(fresh_issuer: DevIssuer) -> None:
    v = TokenValidator(fresh_issuer.url, refresh_period=0.1, refetch_interval=60)
    try:
        await v.start()
        assert await eventually(lambda: v.ready)
        before = fresh_issuer.jwks_fetches
        assert await eventually(lambda: fresh_issuer.jwks_fetches - before >= 2)
    finally:
        await v.aclose()


async def test_tls_with_a_private_ca() -> None:
    with DevIssuer(tls=True) as dev:
        assert dev.url.startswith("https://")
        untrusting = TokenValidator(dev.url)
        try:
            with pytest.raises(UnavailableError, match="certificate"):
                await untrusting.refresh()
        finally:
            await untrusting.aclose()
        verify: Trust | ssl.SSLContext
        for verify in (
            Trust.from_directory(Path(dev.ca_file).parent),  # caCertificatesDirectory, as the service does
            ssl.create_default_context(cafile=dev.ca_file),
        ):
            v = TokenValidator(dev.url, verify=verify)
            try:
                user = uuid.uuid4()
                assert (await v.authenticate(bearer(dev.mint(user)))).user_id == user
            finally:
                await v.aclose()


async def test_unknown_kid_during_an_outage_is_503_not_401(fresh_issuer: DevIssuer) -> None:
    """A rotated key we cannot fetch may be genuine: 401 would log the user out, 503 makes them retry."""
    v = TokenValidator(fresh_issuer.url, refetch_interval=0.05)
    try:
        await v.refresh()
        fresh_issuer.set_available(False)
        fresh_issuer.rotate()
        await asyncio.sleep(0.06)
        token = fresh_issuer.mint()
        with pytest.raises(UnavailableError, match="503"):
            await v.authenticate(bearer(token))
        fresh_issuer.set_available(True)
        await asyncio.sleep(0.06)
        await v.authenticate(bearer(token))
        await refused(v, bearer(fresh_issuer.mint(header_overrides={"kid": "made-up"})), 401)
    finally:
        await v.aclose()


@pytest.mark.parametrize("uri", ["identity:5000", "", "ftp://identity", "https://"])
def test_configured_uri_must_be_http(uri: str) -> None:
    with pytest.raises(ConfigurationError, match="identityServerUri"):
        TokenValidator(uri)


# -- the cache -----------------------------------------------------------------------------------


async def test_expired_cached_token_is_refused(issuer: DevIssuer) -> None:
    now = [time.time()]
    v = TokenValidator(issuer.url, clock=lambda: now[0])
    try:
        header = bearer(issuer.mint(lifetime=3600))
        principal = await v.authenticate(header)
        now[0] = principal.expires_at + 299  # within skew
        assert await v.authenticate(header) == principal
        assert v.cache_hits == 1
        now[0] = principal.expires_at + 301
        await refused(v, header, 401, "expired")
        await refused(v, header, 401, "expired")  # and not only the cached copy
    finally:
        await v.aclose()


async def test_cache_is_bounded(issuer: DevIssuer) -> None:
    v = TokenValidator(issuer.url, cache_size=3)
    try:
        headers = [bearer(issuer.mint()) for _ in range(5)]
        principals = [await v.authenticate(h) for h in headers]
        assert await v.authenticate(headers[4]) == principals[4]
        assert v.cache_hits == 1
        # the oldest were evicted: they validate again (no cache hit), to an equal principal
        again = await v.authenticate(headers[0])
        assert again == principals[0] and v.cache_hits == 1
    finally:
        await v.aclose()
