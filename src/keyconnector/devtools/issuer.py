"""A small OpenID issuer that mints Bitwarden-shaped access tokens, for tests, demos and benchmarks.

It is a real HTTP server on loopback (not a mock) so that the token validator is exercised through the
same discovery + key set fetch path it uses against a real identity server, including outages
(:meth:`DevIssuer.set_available`) and signing-key rotation (:meth:`DevIssuer.rotate`).

It speaks two dialects (``flavour``): Bitwarden's identity server (Duende: ``typ: at+jwt``, a ``kid``
in every token and key, issuer = base URL) and Vaultwarden's (docs/compatibility.md section 6.7:
discovery under ``<origin>/identity``, issuer ``"<origin>|login"``, ``typ: JWT``, no ``kid`` anywhere,
no ``iat``), because the validator must accept both without being told which one it talks to.

It is development tooling only: nothing in ``keyconnector serve`` starts it, and it signs whatever it
is asked to sign, including deliberately broken tokens (``alg: none``, HMAC with the public key, a
foreign key under a published ``kid``), because the tests need exactly those.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing import get_context
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from keyconnector.devtools.tls import TlsFiles, local_tls_files
from keyconnector.keypairs.generate import self_signed_certificate

__all__ = ["DevIssuer", "Flavour"]

Flavour = Literal["bitwarden", "vaultwarden"]

DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = DISCOVERY_PATH + "/jwks"
VAULTWARDEN_PREFIX = "/identity"
"""Vaultwarden serves its identity endpoints under its own origin, so ``identityServerUri`` ends here."""
VAULTWARDEN_JWKS_PATH = "/.well-known/jwks"

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_EC_CURVES: dict[str, tuple[ec.EllipticCurve, str, int]] = {
    # JWK curve name -> (curve, JWS algorithm, coordinate size in bytes)
    "P-256": (ec.SECP256R1(), "ES256", 32),
    "P-384": (ec.SECP384R1(), "ES384", 48),
    "P-521": (ec.SECP521R1(), "ES512", 66),
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_uint(value: int) -> str:
    return _b64url(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))


def _json_segment(obj: Mapping[str, Any]) -> str:
    return _b64url(json.dumps(obj, separators=(",", ":")).encode())


def _sign(key: PrivateKeyTypes | bytes | None, alg: str, signing_input: bytes) -> bytes:
    """Produce the raw JWS signature; deliberately permissive (tests need bad tokens too)."""
    if alg == "none":
        return b""
    family, bits = alg[:2], alg[2:]
    if bits not in _HASHES:
        raise ValueError(f"unsupported algorithm {alg!r}")
    digest = _HASHES[bits]()
    if family == "HS":
        if not isinstance(key, bytes):
            raise ValueError("an HS* token needs key=<secret bytes>")
        return hmac.new(key, signing_input, digest.name).digest()
    if family in ("RS", "PS"):
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{alg} needs an RSA private key")
        pad: padding.AsymmetricPadding = (
            padding.PKCS1v15()
            if family == "RS"
            else padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        )
        return key.sign(signing_input, pad, digest)
    if family == "ES":
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{alg} needs an EC private key")
        size = (key.curve.key_size + 7) // 8
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(digest)))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    raise ValueError(f"unsupported algorithm {alg!r}")


def _sign_batch(private_pem: bytes, alg: str, signing_inputs: list[bytes]) -> list[str]:
    """Worker-process entry point of :meth:`DevIssuer.mint_many` (module level so it pickles)."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    return [_b64url(_sign(key, alg, si)) for si in signing_inputs]


@dataclass(slots=True)
class _SigningKey:
    kid: str
    alg: str
    private: PrivateKeyTypes
    jwk: dict[str, Any]


def _self_signed_x5(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    """x5c and x5t for a key, as Duende publishes them when it signs with a certificate."""
    cert = self_signed_certificate(key, common_name="Key Connector dev issuer", days=365)
    der = cert.public_bytes(serialization.Encoding.DER)
    return base64.b64encode(der).decode("ascii"), _b64url(hashlib.sha1(der, usedforsecurity=False).digest())


def _make_rsa(bits: int) -> _SigningKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    numbers = private.public_key().public_numbers()
    kid = secrets.token_hex(16).upper()
    x5c, x5t = _self_signed_x5(private)
    jwk = {
        "kty": "RSA",
        "use": "sig",
        "kid": kid,
        "x5t": x5t,
        "e": _b64url_uint(numbers.e),
        "n": _b64url_uint(numbers.n),
        "x5c": [x5c],
        "alg": "RS256",
    }
    return _SigningKey(kid, "RS256", private, jwk)


def _make_ec(curve_name: str) -> _SigningKey:
    if curve_name not in _EC_CURVES:
        raise ValueError(f"unsupported curve {curve_name!r}; use one of {sorted(_EC_CURVES)}")
    curve, alg, size = _EC_CURVES[curve_name]
    private = ec.generate_private_key(curve)
    numbers = private.public_key().public_numbers()
    kid = secrets.token_hex(16).upper()
    jwk = {
        "kty": "EC",
        "use": "sig",
        "kid": kid,
        "crv": curve_name,
        "x": _b64url(numbers.x.to_bytes(size, "big")),
        "y": _b64url(numbers.y.to_bytes(size, "big")),
        "alg": alg,
    }
    return _SigningKey(kid, alg, private, jwk)


class DevIssuer:
    """A development identity server: discovery document, key set, and a token mint.

    ``issuer`` defaults to the server's own base URL; pass another value to mimic a self-hosted
    Bitwarden, whose identity server is reached at ``http://identity:5000`` but issues
    ``http://identity``. With ``flavour="vaultwarden"`` the default issuer is ``"<origin>|login"``,
    :attr:`url` is ``<origin>/identity`` and neither keys nor tokens carry a ``kid``; :meth:`rotate`
    then adds a second kid-less key, as an operator replacing Vaultwarden's ``rsa_key.pem`` behind a
    cached key set would produce.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        issuer: str | None = None,
        key_bits: int = 2048,
        tls: bool = False,
        flavour: Flavour = "bitwarden",
    ) -> None:
        if flavour not in ("bitwarden", "vaultwarden"):
            raise ValueError(f"flavour must be 'bitwarden' or 'vaultwarden', not {flavour!r}")
        self.flavour: Flavour = flavour
        self._prefix = VAULTWARDEN_PREFIX if flavour == "vaultwarden" else ""
        self._discovery_path = self._prefix + DISCOVERY_PATH
        self._jwks_path = self._prefix + (VAULTWARDEN_JWKS_PATH if flavour == "vaultwarden" else JWKS_PATH)
        self._host = host
        self._tls = tls
        self._tls_dir: tempfile.TemporaryDirectory[str] | None = None
        self._tls_files: TlsFiles | None = None
        self._port = port
        self._issuer = issuer
        self._key_bits = key_bits
        self._lock = threading.Lock()
        self._keys: dict[str, _SigningKey] = {}
        first = _make_rsa(key_bits)
        self._keys[first.kid] = first
        self._current = first.kid
        self._jwks_body = b""
        self._available = True
        self._delay = 0.0
        self._jwks_fetches = 0
        self._discovery_fetches = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._publish()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> DevIssuer:
        """Bind (a free port when ``port=0``) and serve from a daemon thread."""
        if self._server is not None:
            return self
        server = ThreadingHTTPServer((self._host, self._port), self._handler_class())
        server.daemon_threads = True
        if self._tls:
            server.socket = self._server_tls_context().wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="dev-issuer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._tls_dir is not None:
            self._tls_dir.cleanup()
            self._tls_dir = None
            self._tls_files = None

    def _server_tls_context(self) -> ssl.SSLContext:
        """A throw-away CA and a server certificate for 127.0.0.1/localhost, written to a temp dir."""
        self._tls_dir = tempfile.TemporaryDirectory(prefix="keyconnector-dev-issuer-")
        self._tls_files = local_tls_files(Path(self._tls_dir.name), "Key Connector dev CA")
        return self._tls_files.server_context()

    @property
    def ca_file(self) -> str:
        """Path of the PEM CA certificate that signed the server certificate (``tls=True`` only)."""
        if self._tls_files is None:
            raise RuntimeError("the dev issuer serves TLS only when made with tls=True and started")
        return str(self._tls_files.ca)

    def __enter__(self) -> DevIssuer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what a validator is configured with -----------------------------------------------------

    @property
    def origin(self) -> str:
        """``scheme://host:port`` of the server (Vaultwarden's ``DOMAIN``)."""
        if self._server is None:
            raise RuntimeError("the dev issuer is not started; call start() first")
        host, port = self._server.server_address[:2]
        host_text = host.decode() if isinstance(host, bytes) else str(host)
        if ":" in host_text:
            host_text = f"[{host_text}]"
        return f"{'https' if self._tls else 'http'}://{host_text}:{port}"

    @property
    def url(self) -> str:
        """What ``identityServerUri`` is set to: the origin, or ``<origin>/identity`` for Vaultwarden."""
        return self.origin + self._prefix

    @property
    def issuer(self) -> str:
        """The ``iss`` of minted tokens and the discovery document's ``issuer``."""
        if self._issuer is not None:
            return self._issuer
        return self.origin + "|login" if self.flavour == "vaultwarden" else self.url

    @property
    def current_kid(self) -> str:
        return self._current

    @property
    def kids(self) -> list[str]:
        with self._lock:
            return list(self._keys)

    @property
    def jwks_fetches(self) -> int:
        """How many times the key set was served (successfully); tests of the refetch throttle read it."""
        with self._lock:
            return self._jwks_fetches

    @property
    def discovery_fetches(self) -> int:
        with self._lock:
            return self._discovery_fetches

    def public_jwk(self, kid: str | None = None) -> dict[str, Any]:
        """The published JWK of a key (the current one by default); tests use it to forge HMAC tokens."""
        with self._lock:
            return dict(self._keys[kid or self._current].jwk)

    def public_key(self, kid: str | None = None) -> Any:
        """The cryptography public key object of a published key."""
        with self._lock:
            return self._keys[kid or self._current].private.public_key()

    # -- operations that change what is published ----------------------------------------------

    def rotate(self, *, keep_old: bool = True) -> str:
        """Add a new RSA signing key and make it current, as Duende's automatic key management does."""
        new = _make_rsa(self._key_bits)
        with self._lock:
            if not keep_old:
                self._keys.clear()
            self._keys[new.kid] = new
            self._current = new.kid
        self._publish()
        return new.kid

    def add_ec_key(self, curve: str = "P-256", *, make_current: bool = False) -> str:
        """Publish an EC signing key; mint with ``kid=<returned kid>, alg="ES256"`` (or ES384/ES512)."""
        new = _make_ec(curve)
        with self._lock:
            self._keys[new.kid] = new
            if make_current:
                self._current = new.kid
        self._publish()
        return new.kid

    def replace_key(self, kid: str, *, keep_old_as: str | None = None) -> None:
        """Publish a new RSA key under an existing ``kid`` (and make it current).

        What an operator who recreates a signing key with the same name produces: tokens that name
        ``kid`` were signed by a key the set no longer holds under that name. ``keep_old_as`` keeps the
        old key published under another kid, so that the set's thumbprints only grow.
        """
        new = _make_rsa(self._key_bits)
        new.kid = kid
        new.jwk["kid"] = kid
        with self._lock:
            old = self._keys.pop(kid)
            if keep_old_as is not None:
                old.kid = keep_old_as
                old.jwk = {**old.jwk, "kid": keep_old_as}
                self._keys[keep_old_as] = old
            self._keys[kid] = new
            self._current = kid
        self._publish()

    def remove_key(self, kid: str) -> None:
        with self._lock:
            del self._keys[kid]
            if self._current == kid and self._keys:
                self._current = next(reversed(self._keys))
        self._publish()

    def set_available(self, up: bool) -> None:
        """When ``False``, discovery and key set answer 503, as during an identity server outage."""
        with self._lock:
            self._available = up

    def set_delay(self, seconds: float) -> None:
        """Answer discovery and key set requests only after ``seconds``: a slow identity server."""
        with self._lock:
            self._delay = seconds

    def _publish(self) -> None:
        with self._lock:
            body = {"keys": [self._published(k.jwk) for k in self._keys.values()]}
            self._jwks_body = json.dumps(body, separators=(",", ":")).encode()

    def _published(self, jwk: dict[str, Any]) -> dict[str, Any]:
        if self.flavour == "bitwarden":
            return jwk
        # Vaultwarden publishes its one RSA key bare: no kid, no certificate.
        return {k: v for k, v in jwk.items() if k not in ("kid", "x5c", "x5t")}

    def _discovery_body(self) -> bytes:
        if self.flavour == "vaultwarden":
            base = self.url
            return json.dumps(
                {
                    "issuer": self.issuer,
                    "jwks_uri": self.origin + self._jwks_path,
                    "authorization_endpoint": base + "/connect/authorize",
                    "token_endpoint": base + "/connect/token",
                    "response_types_supported": ["code"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                },
                separators=(",", ":"),
            ).encode()
        base = self.url
        doc = {
            "issuer": self.issuer,
            "jwks_uri": base + JWKS_PATH,
            "authorization_endpoint": base + "/connect/authorize",
            "token_endpoint": base + "/connect/token",
            "userinfo_endpoint": base + "/connect/userinfo",
            "end_session_endpoint": base + "/connect/endsession",
            "check_session_iframe": base + "/connect/checksession",
            "revocation_endpoint": base + "/connect/revocation",
            "introspection_endpoint": base + "/connect/introspect",
            "device_authorization_endpoint": base + "/connect/deviceauthorization",
            "frontchannel_logout_supported": True,
            "frontchannel_logout_session_supported": True,
            "backchannel_logout_supported": True,
            "backchannel_logout_session_supported": True,
            "scopes_supported": ["api", "offline_access", "internal", "api.push", "api.organization"],
            "claims_supported": ["sub", "email", "email_verified", "name", "premium", "sstamp", "device"],
            "grant_types_supported": [
                "authorization_code",
                "client_credentials",
                "refresh_token",
                "implicit",
                "password",
                "urn:ietf:params:oauth:grant-type:device_code",
                "webauthn",
            ],
            "response_types_supported": ["code", "token", "id_token", "id_token token", "code id_token"],
            "response_modes_supported": ["form_post", "query", "fragment"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "subject_types_supported": ["public"],
            "code_challenge_methods_supported": ["plain", "S256"],
            "request_parameter_supported": True,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in two writes; without this, Nagle plus the client's
                # delayed ACK add ~40 ms to every keep-alive response.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with owner._lock:
                    available, delay = owner._available, owner._delay
                if delay:
                    time.sleep(delay)
                if path not in (owner._discovery_path, owner._jwks_path):
                    self._reply(404, b'{"error":"not found"}')
                elif not available:
                    self._reply(503, b"Service Unavailable", "text/plain")
                elif path == owner._discovery_path:
                    with owner._lock:
                        owner._discovery_fetches += 1
                    self._reply(200, owner._discovery_body())
                else:
                    with owner._lock:
                        owner._jwks_fetches += 1
                        body = owner._jwks_body
                    self._reply(200, body, "application/jwk-set+json")

            def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Silence the per-request stderr line: tests and benchmarks would drown in it."""

        return Handler

    # -- minting ---------------------------------------------------------------------------------

    def _claims(
        self,
        sub: str | uuid.UUID | None,
        scope: Sequence[str] | str | None,
        amr: Sequence[str] | str | None,
        lifetime: int,
        not_before: int | None,
        issued_at: int | None,
        issuer: str | None,
        extra_claims: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        iat = int(time.time()) if issued_at is None else issued_at
        if self.flavour == "vaultwarden":
            # Vaultwarden's LoginJwtClaims: no iat, auth_time, idp or jti.
            claims: dict[str, Any] = {
                "nbf": iat if not_before is None else not_before,
                "exp": iat + lifetime,
                "iss": self.issuer if issuer is None else issuer,
                "sub": str(uuid.uuid4() if sub is None else sub),
                "premium": True,
                "name": "Dev User",
                "email": "user@example.com",
                "email_verified": True,
                "sstamp": str(uuid.uuid4()),
                "device": str(uuid.uuid4()),
                "devicetype": "ChromeBrowser",
                "client_id": "web",
            }
        else:
            claims = {
                "nbf": iat if not_before is None else not_before,
                "exp": iat + lifetime,
                "iss": self.issuer if issuer is None else issuer,
                "client_id": "web",
                "sub": str(uuid.uuid4() if sub is None else sub),
                "auth_time": iat,
                "idp": "bitwarden",
                "premium": False,
                "email": "user@example.com",
                "email_verified": True,
                "sstamp": str(uuid.uuid4()),
                "name": "Dev User",
                "device": str(uuid.uuid4()),
                "devicetype": "9",
                "jti": secrets.token_hex(16).upper(),
                "iat": iat,
            }
        if scope is not None:
            claims["scope"] = scope if isinstance(scope, str) else list(scope)
        if amr is not None:
            claims["amr"] = amr if isinstance(amr, str) else list(amr)
        for name, value in (extra_claims or {}).items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def _header(
        self, alg: str, kid: str | None, header_overrides: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        header: dict[str, Any] = (
            {"typ": "JWT", "alg": alg}
            if self.flavour == "vaultwarden"
            else {"alg": alg, "kid": kid, "typ": "at+jwt"}
        )
        for name, value in (header_overrides or {}).items():
            if value is None:
                header.pop(name, None)
            else:
                header[name] = value
        return header

    def _signing_key(self, kid: str | None, key: PrivateKeyTypes | bytes | None) -> tuple[str, Any]:
        with self._lock:
            chosen = kid or self._current
            if key is not None:
                return chosen, key
            if chosen not in self._keys:
                raise KeyError(f"no key {chosen!r} at this issuer; pass key=... to sign with a foreign key")
            return chosen, self._keys[chosen].private

    def mint(
        self,
        sub: str | uuid.UUID | None = None,
        *,
        scope: Sequence[str] | str | None = ("api", "offline_access"),
        amr: Sequence[str] | str | None = ("external",),
        lifetime: int = 3600,
        not_before: int | None = None,
        issued_at: int | None = None,
        alg: str = "RS256",
        kid: str | None = None,
        extra_claims: Mapping[str, Any] | None = None,
        issuer: str | None = None,
        header_overrides: Mapping[str, Any] | None = None,
        key: PrivateKeyTypes | bytes | None = None,
    ) -> str:
        """One token shaped like the flavour's: Bitwarden's (``typ: at+jwt``, ``kid``, ``iat``, ``jti``,
        client_id, sstamp, device...) or Vaultwarden's (``typ: JWT``, no ``kid``, no ``iat``).

        ``scope``/``amr`` given as a string produce the shapes upstream answers 403 to; ``None`` omits
        the claim. ``extra_claims`` and ``header_overrides`` add or replace members; a ``None`` value
        removes one (``extra_claims={"sub": None}``, ``header_overrides={"kid": None}``). ``key``
        signs with something other than the issuer's key (a foreign private key, or secret bytes for
        ``HS*``) while keeping ``kid`` (default: the current kid).
        """
        chosen_kid, signing_key = self._signing_key(kid, key)
        header = self._header(alg, chosen_kid, header_overrides)
        claims = self._claims(sub, scope, amr, lifetime, not_before, issued_at, issuer, extra_claims)
        signing_input = _json_segment(header) + "." + _json_segment(claims)
        return signing_input + "." + _b64url(_sign(signing_key, alg, signing_input.encode("ascii")))

    def sign_payload(
        self,
        payload: bytes,
        *,
        alg: str = "RS256",
        kid: str | None = None,
        header: Mapping[str, Any] | None = None,
    ) -> str:
        """A token over ``payload`` exactly as given, signed with the issuer's key.

        For claims ``json.dumps`` cannot write from Python values (``{"exp": Infinity}`` in an int
        claim, a 400-digit number written by hand, duplicate names): the tests of what the service
        does with numbers a real identity server never sends, but a compromised or buggy one could.
        """
        chosen_kid, signing_key = self._signing_key(kid, None)
        signing_input = _json_segment(self._header(alg, chosen_kid, header)) + "." + _b64url(payload)
        return signing_input + "." + _b64url(_sign(signing_key, alg, signing_input.encode("ascii")))

    def mint_many(
        self,
        n: int,
        *,
        scope: Sequence[str] | str | None = ("api", "offline_access"),
        amr: Sequence[str] | str | None = ("external",),
        lifetime: int = 3600,
        alg: str = "RS256",
        kid: str | None = None,
        workers: int = 1,
    ) -> list[tuple[uuid.UUID, str]]:
        """``n`` valid tokens for distinct random users, for benchmarks of a login storm.

        The header segment and the constant part of the claims are encoded once; what remains is one
        private-key operation per token (~0.3 ms for RSA-2048, so 100k tokens take about 30 s on one
        core), which ``workers > 1`` spreads over spawned processes (so the calling script needs the
        usual ``if __name__ == "__main__":`` guard).
        """
        chosen_kid, signing_key = self._signing_key(kid, None)
        header_segment = _json_segment(self._header(alg, chosen_kid, None))
        template = self._claims(None, scope, amr, lifetime, None, None, None, None)
        # Everything but the per-user values is serialised once; the per-token part is spliced in.
        fixed = {k: v for k, v in template.items() if k not in ("sub", "sstamp", "device", "jti")}
        fixed_json = json.dumps(fixed, separators=(",", ":"))[1:-1]
        with_jti = "jti" in template  # Vaultwarden's tokens have none
        users = [uuid.uuid4() for _ in range(n)]
        inputs: list[bytes] = []
        for user in users:
            stamp, device = uuid.uuid4(), uuid.uuid4()
            jti = f'"jti":"{uuid.uuid4().hex.upper()}",' if with_jti else ""
            claims_json = f'{{"sub":"{user}","sstamp":"{stamp}","device":"{device}",{jti}{fixed_json}}}'
            payload_segment = _b64url(claims_json.encode())
            inputs.append((header_segment + "." + payload_segment).encode("ascii"))
        signatures = self._sign_all(signing_key, alg, inputs, workers)
        return [
            (user, si.decode("ascii") + "." + sig)
            for user, si, sig in zip(users, inputs, signatures, strict=True)
        ]

    @staticmethod
    def _sign_all(key: Any, alg: str, inputs: list[bytes], workers: int) -> list[str]:
        if workers <= 1 or len(inputs) < 1000:
            return [_b64url(_sign(key, alg, si)) for si in inputs]
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        chunk = max(500, len(inputs) // (workers * 4))
        batches = [inputs[i : i + chunk] for i in range(0, len(inputs), chunk)]
        # spawn, not fork: the HTTP server thread is running and forking a threaded process is unsafe.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            results: Iterable[list[str]] = pool.map(
                _sign_batch, [pem] * len(batches), [alg] * len(batches), batches
            )
            return [sig for batch in results for sig in batch]
