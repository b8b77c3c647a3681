"""Access-token validation: signature, lifetime, issuer, then Bitwarden's "Application" policy.

This is the hot path of a login storm, where every request carries a token never seen before, so the
work per token is kept to what cannot be avoided:

* the JOSE header is decoded once per distinct header (every token of one signing key has the same
  one) and selects a verifier prepared when the key set was fetched (one dict lookup by ``kid``, one
  by ``alg``); joserfc imports the keys, the RSA check itself calls cryptography with prebuilt
  padding and hash objects;
* a token without ``kid`` (Vaultwarden's) is tried against the keys that accept its ``alg``, at most
  ``MAX_KEYS_WITHOUT_KID``, in a branch of its own: the ``kid`` path does not get any slower;
* claims are checked by hand on the decoded dict (no claims-registry machinery);
* tokens that passed everything are cached (SHA-256 of the token -> the principal as plain values,
  until ``exp``, at most ``cache_size`` entries, oldest evicted first), so a client that reuses its
  token costs a hash, a dict lookup and an expiry check. The cache is keyed by a digest rather than the token
  itself because 100,000 Bitwarden tokens of ~1.1 kB would otherwise pin over 100 MB.

Measured on the 2-core development machine (Python 3.11.7, joserfc 1.8, cryptography 50; RSA-2048
RS256 Bitwarden-shaped tokens of 1,074 characters from ``DevIssuer.mint_many``; ``await
authenticate("Bearer ...")`` in a loop over 3,000 distinct tokens, median of 5 rounds):

=================================================  ===========
``authenticate``, fresh token (cache miss)           37-41 µs
``authenticate``, cached token                        2.0 µs
for comparison, ``joserfc.jws.deserialize_compact``  40-42 µs  (signature only, no claim checks)
for comparison, ``joserfc.jwt.decode``               45-50 µs  (no claim checks either)
for comparison, the RSA-2048 verify alone             20 µs
=================================================  ===========

Of the ~17 µs a fresh token costs beyond the RSA operation, about 8 µs is base64 + JSON of the claims
(19 of them in a Bitwarden token); the rest is the digest, the GUID, the signature's base64 and the
cache insert. A cached token costs splitting the Authorization header, SHA-256 of the token, a dict
lookup and a clock read.

Outcomes follow the compatibility contract: 401 for a missing, malformed, badly signed, foreign,
expired or not-yet-valid token; 403 for a valid token that fails the policy; ``UnavailableError``
(503) while the identity server's keys cannot be had.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import ssl
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from keyconnector.auth.jwks import MAX_KEYS_WITHOUT_KID, KeySetSource, SigningKeys, Verifier
from keyconnector.runtime.trust import Trust

__all__ = ["AuthError", "Principal", "TokenValidator"]

MAX_TOKEN_LENGTH = 16 * 1024  # Bitwarden tokens are ~1-2 kB; anything far bigger is not one of them

_URLSAFE = bytes.maketrans(b"-_", b"+/")
_a2b = binascii.a2b_base64
_loads = json.loads
_sha256 = hashlib.sha256
_UUID = uuid.UUID
_DECODE_ERRORS = (ValueError, RecursionError)  # binascii.Error, JSONDecodeError, UnicodeDecodeError
_NUMBER = (int, float)
_EARLIEST = 0
"""NumericDate bounds (RFC 7519: seconds since 1970): a time outside them is no time at all."""
_LATEST = 253_402_300_800  # 10000-01-01T00:00:00Z, beyond what datetime (and any real token) holds
_HEADER_CACHE_SIZE = 64


def _b64(segment: bytes) -> bytes:
    # Lenient decoding is safe here: the signature covers the segments as sent, not their decoding.
    return _a2b(segment.translate(_URLSAFE) + b"==")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a valid token speaks for."""

    user_id: uuid.UUID
    client_id: str | None
    expires_at: float


class AuthError(Exception):
    """The request is refused: ``status`` 401 (no valid token) or 403 (valid token, policy says no).

    ``message`` goes to the client as ``{"message": ...}``; it says why and never contains the token.
    """

    def __init__(self, status: int, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        """A short fixed code for metrics (``keyconnector_token_validation_failures_total``): decided
        where the refusal is raised, so that nothing downstream has to recognise the wording."""


class _UnknownKey(Exception):
    """No key of the current set signed the token, and a newer set might have: worth one (throttled)
    refetch. ``refusal`` is the 401 to give if the refetch changes nothing (``None``: an unknown ``kid``)."""

    def __init__(self, refusal: AuthError | None = None) -> None:
        super().__init__()
        self.refusal = refusal


def _unauthorized(message: str, reason: str = "malformed") -> AuthError:
    return AuthError(401, message, reason)


def _forbidden(message: str) -> AuthError:
    """The token is valid, but the service's policy (amr, scope, subject) says no."""
    return AuthError(403, message, "policy")


_MALFORMED = "the bearer token is malformed"
_UNKNOWN_KEY = "the token was signed with a key the identity server does not publish"


class TokenValidator:
    """Validates Bitwarden access tokens against the identity server's published keys.

    ``identity_server_uri`` is ``identityServerUri`` as configured (a trailing slash is fine); the
    issuer tokens are checked against comes from its discovery document. ``verify`` is handed to
    httpx for TLS: the deployment's :class:`~keyconnector.runtime.trust.Trust` (what the service
    passes, so the identity server is trusted as every other outgoing connection is), an
    ``SSLContext``, or a bool.
    ``clock`` exists so that tests can move time without sleeping. ``outage_expected``: nothing is
    expected to answer at that address (``make run``'s development URL), so an outage is logged at
    INFO rather than WARNING.
    """

    def __init__(
        self,
        identity_server_uri: str,
        *,
        http_client: httpx.AsyncClient | None = None,
        verify: Trust | ssl.SSLContext | bool = True,
        refetch_interval: float = 5.0,
        clock_skew: float = 300.0,
        cache_size: int = 100_000,
        refresh_period: float = 3600.0,
        clock: Callable[[], float] = time.time,
        outage_expected: bool = False,
    ) -> None:
        self._source = KeySetSource(
            identity_server_uri,
            http_client=http_client,
            verify=verify,
            refetch_interval=refetch_interval,
            refresh_period=refresh_period,
            outage_expected=outage_expected,
        )
        self._source.on_change(self._key_set_changed)
        self._skew = float(clock_skew)
        self._cache_size = max(0, cache_size)
        # Values are tuples of plain values, not Principal/UUID objects: the garbage collector untracks
        # such tuples, so a full cache does not make full collections (which stall every request in
        # the worker) walk 100,000 entries. Measured in a login storm: 50-120 ms pauses before.
        self._cache: OrderedDict[bytes, tuple[int, str | None, float]] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        self.failures: dict[str, int] = {}
        """Refused tokens by ``AuthError.reason``, for the metrics layer to copy."""
        # All tokens from one identity server key share one header segment: decode it once.
        self._headers: dict[bytes, dict[str, object]] = {}
        self._clock = clock

    # -- lifecycle and status --------------------------------------------------------------------

    async def start(self) -> None:
        """Begin loading the key set in the background; the service must start even if it is down."""
        self._source.start()

    @property
    def ready(self) -> bool:
        return self._source.current is not None

    def status(self) -> str:
        return self._source.describe()

    async def settle(self) -> None:
        """Before readiness answers: with no key set yet, join the fetch in flight (or start one, at
        most once per refetch interval), so that a probe right after start-up reports the identity
        server as it is, not a first fetch that has not finished."""
        if not self.ready:
            await self._source.fetch_if_allowed()

    async def refresh(self) -> None:
        """Fetch discovery and key set now, ignoring the throttle; raise ``UnavailableError`` if it fails."""
        await self._source.refresh()

    async def aclose(self) -> None:
        await self._source.aclose()

    def _key_set_changed(self, old: SigningKeys | None, new: SigningKeys) -> None:
        """Drop the cached tokens when a key that may have vouched for them no longer would.

        A cached principal stands for a signature checked with the old keys, and must go when a
        fresh check could fail: the issuer changed; a key was withdrawn (compared by thumbprint,
        since kid-less key sets, Vaultwarden's, have no other name for a key: this also covers the
        only kid-less key being replaced); or a ``kid`` was withdrawn or now names another key (the
        thumbprints alone miss a reused kid while the old key stays published under another name).
        Adding keys, as rotation does, keeps the cache. Clearing all of it rather than the affected
        entries keeps each entry small and the hot path free of bookkeeping; key changes are rare.
        """
        if old is None:
            return
        if (
            old.issuer != new.issuer
            or not old.thumbprints <= new.thumbprints
            or any(
                (replacement := new.keys.get(kid)) is None or replacement.thumbprint != key.thumbprint
                for kid, key in old.keys.items()
            )
        ):
            self._cache.clear()

    # -- the hot path ----------------------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal of a ``Bearer`` token; raises :class:`AuthError` or ``UnavailableError``."""
        try:
            return await self._authenticate(authorization)
        except AuthError as exc:
            # Counted here as plain integers (the metrics layer copies them, by reason, never the token).
            self.failures[exc.reason] = self.failures.get(exc.reason, 0) + 1
            raise

    async def _authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise _unauthorized("the request carries no bearer token (no Authorization header)", "missing")
        scheme, _, rest = authorization.strip().partition(" ")
        if scheme != "Bearer" and scheme.lower() != "bearer":
            raise _unauthorized("the Authorization header does not use the Bearer scheme", "missing")
        token = rest.strip()
        if not token:
            raise _unauthorized("the Authorization header carries no token", "missing")
        if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise _unauthorized(_MALFORMED)
        raw = token.encode("ascii")
        digest = _sha256(raw).digest()

        cached = self._cache.get(digest)
        if cached is not None:
            if self._clock() < cached[2] + self._skew:
                self.cache_hits += 1
                return Principal(_UUID(int=cached[0]), cached[1], cached[2])
            del self._cache[digest]
            raise _unauthorized("the token has expired", "expired")
        self.cache_misses += 1

        source = self._source
        key_set = source.current
        if key_set is None:
            await source.fetch_if_allowed()
            key_set = source.current
            if key_set is None:
                raise source.unavailable()
        try:
            principal = self._verify(raw, key_set)
        except _UnknownKey as unknown:
            principal = await self._verify_after_refetch(raw, key_set, unknown.refusal)

        if self._cache_size:
            cache = self._cache
            if len(cache) >= self._cache_size:
                cache.popitem(last=False)
            cache[digest] = (principal.user_id.int, principal.client_id, principal.expires_at)
        return principal

    async def _verify_after_refetch(
        self, raw: bytes, stale: SigningKeys, refusal: AuthError | None
    ) -> Principal:
        """Fetch the key set again (throttled) and verify once more; refuse if nothing changed."""
        source = self._source
        await source.fetch_if_allowed()
        refreshed = source.current
        if refreshed is not None and refreshed is not stale:
            try:
                return self._verify(raw, refreshed)
            except _UnknownKey as again:
                refusal = again.refusal
        if source.last_error is not None:
            # We cannot tell a rotated key from a made-up one while the identity server is down,
            # and clients log the user out on 401: answer 503 so that they retry.
            raise source.unavailable()
        raise refusal if refusal is not None else _unauthorized(_UNKNOWN_KEY, "unknown_key")

    def _verify(self, raw: bytes, key_set: SigningKeys) -> Principal:
        """Check one token completely; 401 problems are checked before policy (403) problems."""
        parts = raw.split(b".")
        if len(parts) != 3:
            raise _unauthorized(_MALFORMED + " (not a signed JWT)")
        header_segment, payload_segment, signature_segment = parts
        header = self._headers.get(header_segment)
        if header is None:
            header = _decode_header(header_segment)
            headers = self._headers
            if len(headers) >= _HEADER_CACHE_SIZE:
                headers.clear()  # only ever full when someone sends made-up headers
            headers[header_segment] = header

        kid = header.get("kid")
        alg = header.get("alg")
        signed = raw[: len(header_segment) + 1 + len(payload_segment)]
        if type(kid) is str:
            key = key_set.keys.get(kid)
            if key is None:
                raise _UnknownKey
            verifier = key.verifiers.get(alg) if type(alg) is str else None
            if verifier is None:
                raise _unauthorized(
                    "the token's signing algorithm is not accepted for its key", "bad_algorithm"
                )
            try:
                signature = _b64(signature_segment)
            except _DECODE_ERRORS:
                raise _unauthorized(_MALFORMED + " (its signature does not decode)") from None
            if not verifier(signed, signature):
                # Worth one (throttled) refetch, like an unknown kid: an identity server that made a
                # new key under an old kid signs with it before our hourly refresh would notice.
                raise _UnknownKey(_unauthorized("the token's signature is invalid", "bad_signature"))
        elif kid is None:
            candidates = key_set.without_kid.get(alg) if type(alg) is str else None
            _verify_without_kid(candidates, alg, signed, signature_segment)
        else:
            raise _unauthorized(_MALFORMED + " (its 'kid' is not a string)")

        try:
            claims = _loads(_b64(payload_segment).decode())
        except _DECODE_ERRORS:
            raise _unauthorized(_MALFORMED + " (its claims do not decode)") from None
        if type(claims) is not dict:
            raise _unauthorized(_MALFORMED + " (its claims are not a JSON object)")

        if claims.get("iss") != key_set.issuer:
            raise _unauthorized("the token's issuer is not the identity server's", "wrong_issuer")
        exp = claims.get("exp")
        # true and false are ints to Python, not times to JWT. The range test comes before any
        # arithmetic and is written so that NaN fails it: a 400-digit integer would overflow the
        # float arithmetic below (a 500), and Infinity would never expire.
        if not isinstance(exp, _NUMBER) or exp is True or exp is False or not _EARLIEST < exp < _LATEST:
            raise _unauthorized("the token has no valid expiry ('exp': a NumericDate within years 1970-9999)")
        now = self._clock()
        skew = self._skew
        if not now < exp + skew:
            raise _unauthorized("the token has expired", "expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not isinstance(nbf, _NUMBER) or nbf is True or nbf is False or not _EARLIEST <= nbf < _LATEST:
                raise _unauthorized("the token's 'nbf' is not a NumericDate within years 1970-9999")
            if nbf - skew > now:
                raise _unauthorized("the token is not valid yet", "not_yet_valid")

        amr = claims.get("amr")
        if type(amr) is not list or ("Application" not in amr and "external" not in amr):
            raise _forbidden(_amr_problem(amr))
        scope = claims.get("scope")
        if type(scope) is not list or "api" not in scope:
            raise _forbidden(_scope_problem(scope))
        sub = claims.get("sub")
        try:
            if type(sub) is not str:
                raise ValueError
            user_id = _UUID(sub)
        except ValueError:
            raise _forbidden("the token's subject ('sub') is not a user id (GUID)") from None
        client_id = claims.get("client_id")
        return Principal(user_id, client_id if type(client_id) is str else None, float(exp))


def _verify_without_kid(
    candidates: tuple[Verifier, ...] | None, alg: object, signed: bytes, signature_segment: bytes
) -> None:
    """A token without ``kid``: try each key that accepts its algorithm, at most a few.

    The bound is what keeps a flood of forged kid-less tokens from costing more than a few public-key
    operations each; a key set with more candidates fails closed rather than trying them all.
    """
    if not candidates:
        raise _unauthorized(
            "the token has no key id ('kid') and no key of the identity server accepts its signing algorithm",
            "bad_algorithm",
        )
    count = len(candidates)
    if count > MAX_KEYS_WITHOUT_KID:
        raise _unauthorized(
            f"the token has no key id ('kid') and the identity server publishes {count} keys for {alg}; "
            f"a token without one is tried against at most {MAX_KEYS_WITHOUT_KID}",
            "unknown_key",
        )
    try:
        signature = _b64(signature_segment)
    except _DECODE_ERRORS:
        raise _unauthorized(_MALFORMED + " (its signature does not decode)") from None
    for verifier in candidates:
        if verifier(signed, signature):
            return
    keys = "its only key" if count == 1 else f"any of its {count} keys for {alg}"
    raise _UnknownKey(
        _unauthorized(
            f"the token has no key id ('kid') and its signature does not match {keys}",
            "bad_signature",
        )
    )


def _decode_header(segment: bytes) -> dict[str, object]:
    try:
        header = _loads(_b64(segment).decode())
    except _DECODE_ERRORS:
        raise _unauthorized(_MALFORMED + " (its header does not decode)") from None
    if type(header) is not dict:
        raise _unauthorized(_MALFORMED + " (its header is not a JSON object)")
    if "crit" in header:
        raise _unauthorized("the token has a 'crit' header, which is not supported")
    return header


def _amr_problem(amr: object) -> str:
    if amr is None:
        return "the token has no authentication method ('amr')"
    if type(amr) is not list:
        return "the token's authentication method ('amr') is not a JSON array"
    return "the token's authentication method ('amr') is neither 'Application' nor 'external'"


def _scope_problem(scope: object) -> str:
    if scope is None:
        return "the token has no 'scope'"
    if type(scope) is not list:
        return "the token's 'scope' is not a JSON array"
    return "the token lacks the 'api' scope"
