"""Discovery document + key set: fetching, parsing and the rules for when to fetch again.

Why it looks the way it does:

* The identity server is discovered at ``<identityServerUri>/.well-known/openid-configuration`` and its
  ``issuer`` is what tokens are checked against, because a self-hosted Bitwarden is reached at
  ``http://identity:5000`` but issues ``http://identity``.
* Keys are turned into verifiers once per fetch (key import, padding and hash objects), so that the hot
  path does one dictionary lookup and one public-key operation.
* Which algorithms a key accepts follows from the key itself (RSA: RS*/PS*; EC: the ES* of its curve;
  narrowed to the JWK's ``alg`` when it has one). Symmetric (``oct``) keys are never accepted, so
  neither ``none`` nor an HMAC forged with the public key can ever find a verifier.
* A token without ``kid`` (Vaultwarden's, docs/compatibility.md section 6.7) cannot look its key up,
  so the keys that can verify its algorithm are listed per algorithm once per fetch and tried in turn,
  at most :data:`MAX_KEYS_WITHOUT_KID` of them: that bounds what a forged kid-less token costs (each
  try is a public-key operation) and a key set with more such keys refuses these tokens rather than
  trying them all. Tokens with a ``kid`` never pay for this.
* Keys are also identified by their RFC 7638 thumbprint, because a kid-less key set has no other name
  for a key: it is how a withdrawn key is noticed (and the tokens it vouched for dropped from the
  validator's cache) whether or not keys carry a ``kid``.
* Fetches are shared and rate-limited: every caller that needs fresh keys while a fetch is running
  waits for that fetch, and a new one starts at most once per ``refetch_interval``, so a flood of
  tokens with made-up ``kid`` values cannot hammer the identity server.
* Start-up does not depend on the identity server: a background task retries with backoff until the
  key set loads, then refreshes it periodically (key rotation without a token ever carrying an unknown
  ``kid`` still reaches us).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey
from joserfc.jws import JWSRegistry

from keyconnector.errors import ConfigurationError, UnavailableError
from keyconnector.runtime.trust import Trust

__all__ = ["MAX_KEYS_WITHOUT_KID", "KeySetSource", "SigningKeys", "VerificationKey", "parse_key_set"]

log = logging.getLogger("keyconnector.auth")

COMPONENT = "identity server"
DISCOVERY_SUFFIX = "/.well-known/openid-configuration"
MIN_RSA_BITS = 1024  # what upstream's token handler accepts for verification; refusing more breaks installs
MAX_KEYS_WITHOUT_KID = 4
"""How many keys a token without ``kid`` is tried against. Vaultwarden publishes one; a few more cover
a replaced key still published next to its successor. More than this and such tokens are refused."""

#: verify(signing_input, signature) -> valid?
Verifier = Callable[[bytes, bytes], bool]

_RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_HASHES: dict[str, hashes.HashAlgorithm] = {
    "256": hashes.SHA256(),
    "384": hashes.SHA384(),
    "512": hashes.SHA512(),
}


def _rsa_verifier(public: rsa.RSAPublicKey, alg: str) -> Verifier:
    # Calling cryptography directly with prebuilt padding/hash objects saves the key-ops lookup and
    # the per-call hash object that joserfc's algorithm model pays (~2.5 µs of ~34 µs).
    digest = _HASHES[alg[2:]]
    pad: padding.AsymmetricPadding = (
        padding.PKCS1v15()
        if alg.startswith("RS")
        else padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
    )
    verify = public.verify

    def verifier(signing_input: bytes, signature: bytes) -> bool:
        try:
            verify(signature, signing_input, pad, digest)
        except InvalidSignature:
            return False
        return True

    return verifier


def _joserfc_verifier(key: ECKey, alg: str) -> Verifier:
    # EC signatures arrive as raw r||s and need converting to DER; joserfc's model does that (and
    # checks the length), and EC is rare enough on this path not to be worth duplicating.
    model = JWSRegistry.algorithms[alg]

    def verifier(signing_input: bytes, signature: bytes) -> bool:
        return model.verify(signing_input, signature, key)

    return verifier


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One published key, ready to use: the algorithms it may verify and a verifier for each."""

    kid: str | None
    kty: str
    verifiers: Mapping[str, Verifier]
    thumbprint: str = ""
    """RFC 7638: the key's name when it has no ``kid``, and how a changed key set is recognised."""


@dataclass(frozen=True, slots=True)
class SigningKeys:
    """An immutable snapshot of what the identity server published; replaced whole on every fetch."""

    issuer: str
    jwks_uri: str
    keys: Mapping[str, VerificationKey]
    #: for tokens without ``kid``: per algorithm, the verifiers of every usable key that accepts it
    without_kid: Mapping[str, tuple[Verifier, ...]]
    #: RFC 7638 thumbprints of every usable key (with or without ``kid``)
    thumbprints: frozenset[str] = frozenset()
    fetched_at: float = field(default_factory=time.time)
    skipped: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        """Usable keys, with or without ``kid``."""
        return len(self.thumbprints)

    def kidless_overflow(self) -> tuple[str, int] | None:
        """``(alg, keys)`` when tokens without ``kid`` are refused because too many keys could have
        signed them; ``None`` when each algorithm has at most :data:`MAX_KEYS_WITHOUT_KID` keys."""
        worst = max(self.without_kid.items(), key=lambda item: len(item[1]), default=None)
        if worst is None or len(worst[1]) <= MAX_KEYS_WITHOUT_KID:
            return None
        return worst[0], len(worst[1])


def _import_key(jwk: Mapping[str, Any]) -> VerificationKey:
    """Build a :class:`VerificationKey` or raise ``ValueError`` saying why the key is unusable."""
    kty = jwk.get("kty")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"its use is {use!r}, not 'sig'")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ValueError("its key_ops do not include 'verify'")
    verifiers: dict[str, Verifier] = {}
    try:
        if kty == "RSA":
            rsa_key = RSAKey.import_key(dict(jwk))
            public = rsa_key.public_key
            if public.key_size < MIN_RSA_BITS:
                raise ValueError(f"its {public.key_size}-bit modulus is too short")
            for alg in _RSA_ALGS:
                verifiers[alg] = _rsa_verifier(public, alg)
            thumbprint = rsa_key.thumbprint()
        elif kty == "EC":
            ec_key = ECKey.import_key(dict(jwk))
            alg = _EC_ALGS.get(ec_key.curve_name, "")
            if not alg:
                raise ValueError(f"its curve {ec_key.curve_name!r} is not supported")
            verifiers[alg] = _joserfc_verifier(ec_key, alg)
            thumbprint = ec_key.thumbprint()
        else:
            raise ValueError(f"its key type {kty!r} is not accepted (only RSA and EC)")
    except (JoseError, TypeError, KeyError) as exc:
        raise ValueError(f"it does not parse ({type(exc).__name__})") from None
    declared = jwk.get("alg")
    if declared is not None:
        # The JWK says which algorithm it is for: honour it, it narrows what a token may claim.
        if declared not in verifiers:
            raise ValueError(f"its alg {declared!r} does not fit its key type")
        verifiers = {declared: verifiers[declared]}
    kid = jwk.get("kid")
    return VerificationKey(kid if isinstance(kid, str) else None, str(kty), verifiers, thumbprint)


def parse_key_set(document: Any, *, issuer: str, jwks_uri: str) -> SigningKeys:
    """Turn a JWKS document into a :class:`SigningKeys`; unusable keys are skipped and listed, not fatal."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("the key set is not a JSON object with a 'keys' array")
    keys: dict[str, VerificationKey] = {}
    usable: list[VerificationKey] = []
    skipped: list[str] = []
    for index, jwk in enumerate(document["keys"]):
        name = f"key {jwk.get('kid')!r}" if isinstance(jwk, dict) and "kid" in jwk else f"key #{index}"
        if not isinstance(jwk, dict):
            skipped.append(f"{name}: not a JSON object")
            continue
        try:
            key = _import_key(jwk)
        except ValueError as exc:
            skipped.append(f"{name}: {exc}")
            continue
        usable.append(key)
        if key.kid is not None:
            keys[key.kid] = key
    if not usable:
        detail = "; ".join(skipped) if skipped else "it is empty"
        raise ValueError(f"the key set has no usable signing key ({detail})")
    without_kid: dict[str, list[Verifier]] = {}
    seen: set[str] = set()
    for key in usable:
        if key.thumbprint in seen:
            continue  # the same key published twice (under two kids) is one try, not two
        seen.add(key.thumbprint)
        for alg, verifier in key.verifiers.items():
            without_kid.setdefault(alg, []).append(verifier)
    return SigningKeys(
        issuer=issuer,
        jwks_uri=jwks_uri,
        keys=keys,
        without_kid={alg: tuple(verifiers) for alg, verifiers in without_kid.items()},
        thumbprints=frozenset(seen),
        skipped=tuple(skipped),
    )


def redact_url(url: str) -> str:
    """A URL fit for logs and error messages: no user-info, query or fragment (they can hold secrets)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _FetchError(Exception):
    """A reason, fit for operators, why discovery or the key set could not be had."""


class KeySetSource:
    """Owns the current :class:`SigningKeys` and every rule about fetching it.

    ``current`` is read on the hot path without awaiting anything; fetching happens in one shared task.
    """

    def __init__(
        self,
        identity_server_uri: str,
        *,
        http_client: httpx.AsyncClient | None = None,
        verify: Trust | ssl.SSLContext | bool = True,
        refetch_interval: float = 5.0,
        refresh_period: float = 3600.0,
        timeout: float = 5.0,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        outage_expected: bool = False,
    ) -> None:
        base = identity_server_uri.strip().rstrip("/")
        scheme = urlsplit(base).scheme
        if scheme not in ("http", "https") or not urlsplit(base).netloc:
            shown = redact_url(base)
            raise ConfigurationError(
                "identityServerUri",
                "must be an absolute http:// or https:// URL" + (f", not {shown!r}" if shown else ""),
            )
        self.discovery_url = base + DISCOVERY_SUFFIX
        self._require_https = scheme == "https"
        self._owns_client = http_client is None
        self._client = http_client or httpx.AsyncClient(
            verify=verify.ssl_context() if isinstance(verify, Trust) else verify,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            headers={"Accept": "application/json", "User-Agent": "keyconnector"},
        )
        self._refetch_interval = refetch_interval
        self._refresh_period = refresh_period
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        # Where nothing is expected to answer (``make run``'s development URL, explained once at
        # start), an outage is logged at INFO: a newcomer's first screen should not be a WARNING.
        self._outage_expected = outage_expected
        self._backoff = initial_backoff
        self.current: SigningKeys | None = None
        self.last_error: str | None = None
        self._last_attempt = -math.inf  # monotonic time the last fetch started
        self._inflight: asyncio.Task[str | None] | None = None
        self._background: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[SigningKeys | None, SigningKeys], None]] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.get_running_loop().create_task(
                self._run(), name="keyconnector-jwks-refresh"
            )

    async def aclose(self) -> None:
        tasks = [t for t in (self._background, self._inflight) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._background = self._inflight = None
        if self._owns_client:
            await self._client.aclose()

    def on_change(self, listener: Callable[[SigningKeys | None, SigningKeys], None]) -> None:
        """Called with (old, new) whenever a fetch installs a new key set."""
        self._listeners.append(listener)

    @property
    def retry_after(self) -> int:
        """Seconds a client should wait before trying again while no key set is loaded."""
        return max(1, min(int(self._max_backoff), math.ceil(self._backoff)))

    # -- fetching --------------------------------------------------------------------------------

    async def fetch_now(self) -> str | None:
        """Fetch (or join the fetch in flight), ignoring the rate limit; returns the failure, if any."""
        task = self._inflight
        if task is None:
            task = self._begin()
        return await asyncio.shield(task)

    async def fetch_if_allowed(self) -> None:
        """Fetch again unless one started less than ``refetch_interval`` ago; join one in flight."""
        task = self._inflight
        if task is None:
            if time.monotonic() - self._last_attempt < self._refetch_interval:
                return
            task = self._begin()
        await asyncio.shield(task)

    async def refresh(self) -> SigningKeys:
        """Fetch now; raise :class:`UnavailableError` with the reason when it fails."""
        error = await self.fetch_now()
        if error is not None or self.current is None:
            raise UnavailableError(COMPONENT, error or "no key set", retry_after=self.retry_after)
        return self.current

    def unavailable(self) -> UnavailableError:
        reason = self.last_error or "the key set has not been fetched yet"
        return UnavailableError(COMPONENT, reason, retry_after=self.retry_after)

    def _begin(self) -> asyncio.Task[str | None]:
        self._last_attempt = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._fetch(), name="keyconnector-jwks-fetch")
        self._inflight = task
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[str | None]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _load(self) -> SigningKeys:
        discovery = await self._get_json(self.discovery_url, "the discovery document")
        issuer, jwks_uri = self._read_discovery(discovery)
        document = await self._get_json(jwks_uri, "the key set")
        try:
            return parse_key_set(document, issuer=issuer, jwks_uri=jwks_uri)
        except ValueError as exc:
            raise _FetchError(f"{redact_url(jwks_uri)}: {exc}") from None

    async def _fetch(self) -> str | None:
        """One fetch, shared by every waiter; it never raises, failures come back as the reason."""
        try:
            key_set = await self._load()
        except _FetchError as exc:
            return self._failed(str(exc))
        except Exception as exc:  # a fetch must never raise into the callers that share it
            log.exception("identity server: unexpected error while fetching keys")
            return self._failed(f"unexpected {type(exc).__name__} while fetching keys")
        previous, self.current, self.last_error = self.current, key_set, None
        self._backoff = self._initial_backoff
        if (
            previous is None
            or previous.thumbprints != key_set.thumbprints
            or previous.issuer != key_set.issuer
        ):
            log.info(
                "identity server: issuer %s, %d key(s) %s%s",
                key_set.issuer,
                key_set.count,
                ", ".join(key_set.keys) or "(no kid)",
                "; skipped " + "; ".join(key_set.skipped) if key_set.skipped else "",
            )
            overflow = key_set.kidless_overflow()
            if overflow is not None and len(key_set.keys) < key_set.count:
                # Only worth a warning when some key has no kid: then its tokens have none either.
                alg, count = overflow
                log.warning(
                    "identity server: %s publishes %d keys for %s, some without a 'kid', and a token "
                    "without a 'kid' is tried against at most %d: such tokens are refused. Check that "
                    "identityServerUri names the server that signs the tokens, and have it publish "
                    "fewer keys or give each a 'kid'",
                    redact_url(key_set.jwks_uri),
                    count,
                    alg,
                    MAX_KEYS_WITHOUT_KID,
                )
        for listener in self._listeners:
            listener(previous, key_set)
        return None

    def _failed(self, reason: str) -> str:
        if reason != self.last_error:  # log transitions, not every retry of the same outage
            if self._outage_expected:
                log.info("identity server: %s", reason)
            else:
                log.warning("identity server: %s", reason)
        self.last_error = reason
        return reason

    async def _get_json(self, url: str, what: str) -> Any:
        shown = redact_url(url)
        try:
            response = await self._client.get(url)
        except httpx.TimeoutException:
            raise _FetchError(f"{what} at {shown} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise _FetchError(f"{what} at {shown} cannot be fetched: {_describe(exc)}") from None
        if response.status_code != 200:
            hint = ""
            if 300 <= response.status_code < 400:
                hint = " (redirects are not followed: set identityServerUri to the final URL)"
            raise _FetchError(f"{what} at {shown} answered HTTP {response.status_code}{hint}")
        try:
            return response.json()
        except ValueError:
            raise _FetchError(f"{what} at {shown} is not JSON") from None

    def _read_discovery(self, document: Any) -> tuple[str, str]:
        shown = redact_url(self.discovery_url)
        if not isinstance(document, dict):
            raise _FetchError(f"the discovery document at {shown} is not a JSON object")
        issuer = document.get("issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(issuer, str) or not issuer:
            raise _FetchError(f"the discovery document at {shown} has no 'issuer'")
        if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme not in ("http", "https"):
            raise _FetchError(f"the discovery document at {shown} has no usable 'jwks_uri'")
        if self._require_https and not jwks_uri.startswith("https://"):
            # The operator asked for TLS; a plain-http key set would let anyone on the path swap keys.
            raise _FetchError(f"the discovery document at {shown} points to a key set over plain http")
        return issuer, jwks_uri

    # -- background ------------------------------------------------------------------------------

    async def _run(self) -> None:
        """Load the key set with backoff until it works, then refresh it every ``refresh_period``."""
        while True:
            error = await self.fetch_now()  # never raises: failures come back as a reason
            if error is None:
                await asyncio.sleep(self._refresh_period)
            else:
                delay = self._backoff
                self._backoff = min(self._backoff * 2, self._max_backoff)
                await asyncio.sleep(delay)

    def describe(self) -> str:
        key_set = self.current
        if key_set is None:
            return "not ready: " + (self.last_error or "the key set has not been fetched yet")
        count = key_set.count
        text = f"issuer {key_set.issuer}, {count} key{'s' if count != 1 else ''}"
        age = time.time() - key_set.fetched_at
        text += f", fetched {age:.0f}s ago"
        overflow = key_set.kidless_overflow()
        if overflow is not None and len(key_set.keys) < count:
            text += (
                f"; tokens without a 'kid' are refused ({overflow[1]} keys for {overflow[0]}, "
                f"at most {MAX_KEYS_WITHOUT_KID} are tried)"
            )
        if self.last_error:
            text += f" (last refresh failed: {self.last_error})"
        return text


def _describe(exc: httpx.HTTPError) -> str:
    """The cause of a transport error in a few words, without the request (and so without URLs)."""
    cause: BaseException = exc
    for _ in range(10):  # the root cause (e.g. ConnectionRefusedError) says the most
        nxt = cause.__cause__ or cause.__context__
        if nxt is None:
            break
        cause = nxt
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate not trusted ({cause.verify_message}); put the CA's PEM certificate in the "
            "folder keyConnectorSettings__caCertificatesDirectory names"
        )
    text = str(cause) or str(exc) or type(exc).__name__
    return text[:200]
