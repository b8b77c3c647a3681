"""A stand-in for Azure Key Vault and its Entra ID sign-in, for the official Azure SDK to talk to.

No Key Vault emulator exists, so this module speaks enough of the real REST API, over real HTTPS,
for the unmodified SDK (azure-identity with MSAL, azure-keyvault-keys/-certificates/-secrets) to do
everything the ``azurekv`` providers do:

- Entra ID: the tenant's OpenID discovery document and the OAuth2 client-credentials token endpoint
  (``/{tenant}/oauth2/v2.0/token``), which checks the client secret and answers a wrong one with
  Entra ID's own error shape (``invalid_client``, ``AADSTS7000215``).
- Managed identity: App Service's protocol (``IDENTITY_ENDPOINT`` + ``IDENTITY_HEADER``), which the
  SDK accepts for any URL, so it can point here.
- Key Vault: the 401 challenge on an unauthenticated request, whose ``resource`` is derived from the
  request's Host header exactly as Key Vault derives ``https://vault.azure.net`` from
  ``my-vault.vault.azure.net`` (drop the first label), so that the SDK's check that the challenge
  belongs to the vault's domain passes for ``127.0.0.1:<any port>``, proxy included; keys (get,
  versions, encrypt/decrypt with RSA-OAEP and RSA-OAEP-256), certificates (get) and secrets (get),
  each requiring a bearer token issued here for that resource, and per-identity permissions so that
  403 can be tested.

Everything the stand-in is asked is recorded in ``seen``, so a test can prove that a flow (the
challenge, for one) really happened. One module, ``http.server`` with TLS, threads in the test process.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import secrets
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from keyconnector.devtools.tls import local_tls_files
from keyconnector.keypairs.generate import self_signed_certificate
from tests.support.providers import ProviderEnv

ALL_PERMISSIONS = frozenset(
    {"keys/get", "keys/list", "keys/encrypt", "keys/decrypt", "certificates/get", "secrets/get"}
)
RSA_KEY_OPS = ("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey")
ALGORITHMS = {
    "RSA-OAEP": padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
    "RSA-OAEP-256": padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
    "RSA1_5": padding.PKCS1v15(),
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


# --------------------------------------------------------------------------------------------------
# What the vault holds


@dataclass
class KeyVersion:
    version: str
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    key_ops: tuple[str, ...]
    enabled: bool = True
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class CertificateVersion:
    version: str
    certificate: x509.Certificate
    secret_value: str
    content_type: str
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(frozen=True)
class Identity:
    """An app registration (client secret) or a managed identity, and what the vault lets it do."""

    client_id: str
    secret: str | None
    permissions: frozenset[str]
    object_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    authorized: bool  # an Authorization header was sent
    status: int


@dataclass(frozen=True)
class _Token:
    identity: Identity
    audience: str
    expires: float


class _Reply(Exception):
    """Raised anywhere in request handling to answer at once."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}


def _vault_error(status: int, code: str, message: str, inner: str | None = None) -> _Reply:
    error: dict[str, Any] = {"code": code, "message": message}
    if inner:
        error["innererror"] = {"code": inner}
    return _Reply(status, {"error": error})


class KeyVaultStandIn:
    """One vault and one Entra ID tenant on one HTTPS port of 127.0.0.1."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        # A private CA, as an operator's company CA would be: the SDK must be told to trust it.
        tls = local_tls_files(folder, "Key Vault stand-in test CA")
        self.ca_bundle = tls.ca
        self._context = tls.server_context()
        self.tenant_id = str(uuid.uuid4())
        self.identity_header = secrets.token_urlsafe(16)
        self.identities: dict[str, Identity] = {}
        self.managed_identities: dict[str, Identity] = {}  # "" is the system-assigned one
        self.keys: dict[str, list[KeyVersion]] = {}
        self.certificates: dict[str, list[CertificateVersion]] = {}
        self.seen: list[Seen] = []
        self._tokens: dict[str, _Token] = {}
        self._lock = threading.Lock()
        self._server: _TlsServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- life cycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> KeyVaultStandIn:
        server = _TlsServer(("127.0.0.1", port), _Handler, self._context, self)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="keyvault-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection, as an outage would."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.cut_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    # -- what a test sets up ------------------------------------------------------------------------

    def add_app(self, permissions: frozenset[str] = ALL_PERMISSIONS) -> Identity:
        """An app registration with a client secret (the ``azureKeyvaultAd*`` settings)."""
        identity = Identity(str(uuid.uuid4()), "s3cr~" + secrets.token_urlsafe(24), permissions)
        with self._lock:
            self.identities[identity.client_id] = identity
        return identity

    def add_managed_identity(
        self, client_id: str | None = None, permissions: frozenset[str] = ALL_PERMISSIONS
    ) -> Identity:
        """The system-assigned identity (``client_id`` None) or a user-assigned one."""
        identity = Identity(client_id or "", None, permissions)
        with self._lock:
            self.managed_identities[identity.client_id] = identity
        return identity

    def add_rsa_key(
        self, name: str | None = None, *, bits: int = 2048, key_ops: tuple[str, ...] = RSA_KEY_OPS
    ) -> str:
        """A new key, or a new version of ``name`` (what Key Vault's rotation makes)."""
        return self._add_key(name, rsa.generate_private_key(public_exponent=65537, key_size=bits), key_ops)

    def add_ec_key(self, name: str | None = None) -> str:
        return self._add_key(name, ec.generate_private_key(ec.SECP256R1()), ("sign", "verify"))

    def _add_key(
        self, name: str | None, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, key_ops: tuple[str, ...]
    ) -> str:
        name = name or f"key-{uuid.uuid4().hex[:12]}"
        with self._lock:
            self.keys.setdefault(name, []).append(KeyVersion(uuid.uuid4().hex, key, key_ops))
        return name

    def key(self, name: str, version: str | None = None) -> KeyVersion:
        versions = self.keys[name]
        return next(v for v in versions if v.version == version) if version else versions[-1]

    def public_key(self, name: str, version: str | None = None) -> rsa.RSAPublicKey:
        private = self.key(name, version).private_key
        assert isinstance(private, rsa.RSAPrivateKey)
        return private.public_key()

    def add_certificate(
        self, name: str | None = None, *, content_type: str = "application/x-pkcs12", bits: int = 2048
    ) -> tuple[str, rsa.RSAPrivateKey, x509.Certificate]:
        """A self-signed certificate as Key Vault keeps one: the certificate, its key, and its secret."""
        name = name or f"cert-{uuid.uuid4().hex[:12]}"
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        cert = self_signed_certificate(key, common_name=name, days=365)
        if content_type == "application/x-pkcs12":
            # Key Vault's export: no password, base64 of the PFX.
            blob = pkcs12.serialize_key_and_certificates(None, key, cert, None, serialization.NoEncryption())
            value = base64.b64encode(blob).decode()
        else:
            value = (
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ).decode()
                + cert.public_bytes(serialization.Encoding.PEM).decode()
            )
        version = uuid.uuid4().hex
        with self._lock:
            self.certificates.setdefault(name, []).append(
                CertificateVersion(version, cert, value, content_type)
            )
            # Key Vault also exposes a certificate's key as a key of the same name and version.
            self.keys.setdefault(name, []).append(KeyVersion(version, key, RSA_KEY_OPS))
        return name, key, cert

    def challenges_answered(self) -> list[Seen]:
        return [s for s in self.seen if not s.authorized and s.status == 401]

    # -- Entra ID -------------------------------------------------------------------------------------

    def _openid_configuration(self, base: str, tenant: str) -> Any:
        if tenant != self.tenant_id:
            raise _Reply(400, _aad_error("invalid_tenant", 90002, f"Tenant '{tenant}' not found."))
        return {
            "token_endpoint": f"{base}/{tenant}/oauth2/v2.0/token",
            "authorization_endpoint": f"{base}/{tenant}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/{tenant}/oauth2/v2.0/devicecode",
            "issuer": f"{base}/{tenant}/v2.0",
            "jwks_uri": f"{base}/{tenant}/discovery/v2.0/keys",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "tenant_region_scope": "EU",
        }

    def _token(self, tenant: str, form: dict[str, str]) -> Any:
        if tenant != self.tenant_id:
            raise _Reply(400, _aad_error("invalid_request", 90002, f"Tenant '{tenant}' not found."))
        if form.get("grant_type") != "client_credentials":
            raise _Reply(400, _aad_error("unsupported_grant_type", 70003, "The grant type is not supported."))
        client_id = form.get("client_id", "")
        identity = self.identities.get(client_id)
        if identity is None:
            raise _Reply(
                400,
                _aad_error(
                    "unauthorized_client",
                    700016,
                    f"Application with identifier '{client_id}' was not found in the directory "
                    f"'{tenant}'. This can happen if the application has not been installed by the "
                    "administrator of the tenant or consented to by any user in the tenant.",
                ),
            )
        if not secrets.compare_digest(form.get("client_secret", ""), identity.secret or ""):
            raise _Reply(
                401,
                _aad_error(
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is "
                    "the client secret value, not the client secret ID, for a secret added to app "
                    f"'{client_id}'.",
                ),
            )
        scope = form.get("scope", "")
        resource = next((s[: -len("/.default")] for s in scope.split() if s.endswith("/.default")), None)
        if resource is None:
            raise _Reply(
                400,
                _aad_error("invalid_scope", 1002012, f"The provided value for scope {scope} is not valid."),
            )
        token = self._issue(identity, resource)
        return {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token}

    def _managed_identity_token(self, headers: Any, query: dict[str, str]) -> Any:
        if headers.get("X-IDENTITY-HEADER") != self.identity_header:
            raise _Reply(401, {"statusCode": 401, "message": "Unauthorized request: bad X-IDENTITY-HEADER"})
        identity = self.managed_identities.get(query.get("client_id", ""))
        if identity is None:
            raise _Reply(
                400,
                {
                    "statusCode": 400,
                    "message": "No User Assigned or Delegated Managed Identity found for specified "
                    "ClientId/ResourceId/PrincipalId.",
                    "correlationId": str(uuid.uuid4()),
                },
            )
        resource = query.get("resource", "")
        token = self._issue(identity, resource)
        return {
            "access_token": token,
            "expires_on": str(int(time.time()) + 3600),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": identity.client_id or str(uuid.uuid4()),
        }

    def _issue(self, identity: Identity, audience: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = _Token(identity, audience, time.time() + 3600)
        return token

    # -- Key Vault --------------------------------------------------------------------------------

    def _authenticate(self, host: str, base: str, authorization: str | None) -> Identity:
        # Key Vault's own rule: the resource is the vault's domain without its first label.
        resource = "https://" + host.split(".", 1)[1] if "." in host else base
        challenge = {
            "WWW-Authenticate": f'Bearer authorization="{base}/{self.tenant_id}", resource="{resource}"'
        }
        if not authorization:
            raise _Reply(
                401,
                {
                    "error": {
                        "code": "Unauthorized",
                        "message": "AKV10000: Request is missing a Bearer or PoP token.",
                    }
                },
                challenge,
            )
        scheme, _, value = authorization.partition(" ")
        with self._lock:
            token = self._tokens.get(value) if scheme.lower() == "bearer" else None
        if token is None or token.expires < time.time():
            raise _Reply(
                401, {"error": {"code": "Unauthorized", "message": "AKV10022: Invalid audience."}}, challenge
            )
        if token.audience.rstrip("/") != resource:
            raise _Reply(
                401,
                {
                    "error": {
                        "code": "Unauthorized",
                        "message": f"AKV10022: Invalid audience. Expected {resource}",
                    }
                },
                challenge,
            )
        return token.identity

    def _allow(self, identity: Identity, permission: str) -> None:
        if permission not in identity.permissions:
            area, operation = permission.split("/")
            raise _vault_error(
                403,
                "Forbidden",
                f"The user, group or application 'appid={identity.client_id};oid={identity.object_id};"
                f"iss=https://sts.windows.net/{self.tenant_id}/' does not have {area} {operation} permission "
                "on key vault 'stand-in;location=local'. For help resolving this issue, please see "
                "https://go.microsoft.com/fwlink/?linkid=2125287",
                "AccessDenied",
            )

    def _vault(self, method: str, base: str, path: list[str], identity: Identity, body: Any) -> Any:
        match (method, path):
            case ("GET", ["keys", name, "versions"]):
                self._allow(identity, "keys/list")
                versions = self._key_versions(name)
                return {
                    "value": [
                        {
                            "kid": f"{base}/keys/{name}/{v.version}",
                            "attributes": _attributes(v.created, v.enabled),
                        }
                        for v in versions
                    ],
                    "nextLink": None,
                }
            case ("GET", ["keys", name]) | ("GET", ["keys", name, ""]):
                self._allow(identity, "keys/get")
                return self._key_bundle(base, name, self._key_version(name, None))
            case ("GET", ["keys", name, version]):
                self._allow(identity, "keys/get")
                return self._key_bundle(base, name, self._key_version(name, version))
            case ("POST", ["keys", name, version, ("encrypt" | "decrypt") as operation]):
                self._allow(identity, f"keys/{operation}")
                return self._crypt(base, name, self._key_version(name, version or None), operation, body)
            case ("GET", ["certificates", name, *rest]) if len(rest) <= 1:
                self._allow(identity, "certificates/get")
                return self._certificate_bundle(
                    base, name, self._certificate(name, rest[0] if rest else None)
                )
            case ("GET", ["secrets", name, *rest]) if len(rest) <= 1:
                self._allow(identity, "secrets/get")
                cert = self._certificate(name, rest[0] if rest else None, missing="SecretNotFound")
                return {
                    "value": cert.secret_value,
                    "contentType": cert.content_type,
                    "id": f"{base}/secrets/{name}/{cert.version}",
                    "kid": f"{base}/keys/{name}/{cert.version}",
                    "managed": True,
                    "attributes": _attributes(cert.created, True),
                    "tags": {},
                }
        raise _vault_error(400, "BadParameter", f"The request URI {'/'.join(path)} is not supported.")

    def _key_versions(self, name: str) -> list[KeyVersion]:
        versions = self.keys.get(name)
        if not versions:
            raise _vault_error(
                404,
                "KeyNotFound",
                f"A key with (name/id) {name} was not found in this key vault. If you recently deleted this "
                "key you may be able to recover it using the correct recovery command. For help resolving "
                "this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182",
            )
        return versions

    def _key_version(self, name: str, version: str | None) -> KeyVersion:
        versions = self._key_versions(name)
        if not version:
            return versions[-1]
        for candidate in versions:
            if candidate.version == version:
                return candidate
        raise _vault_error(
            404, "KeyNotFound", f"A key with (name/id) {name}/{version} was not found in this key vault."
        )

    def _key_bundle(self, base: str, name: str, version: KeyVersion) -> Any:
        public = version.private_key.public_key()
        jwk: dict[str, Any] = {
            "kid": f"{base}/keys/{name}/{version.version}",
            "key_ops": list(version.key_ops),
        }
        if isinstance(public, rsa.RSAPublicKey):
            numbers = public.public_numbers()
            jwk.update(kty="RSA", n=b64url(_int_bytes(numbers.n)), e=b64url(_int_bytes(numbers.e)))
        else:
            assert isinstance(public, ec.EllipticCurvePublicKey)
            raw = public.public_numbers()
            jwk.update(
                kty="EC",
                crv="P-256",
                x=b64url(raw.x.to_bytes(32, "big")),
                y=b64url(raw.y.to_bytes(32, "big")),
            )
        attributes = _attributes(version.created, version.enabled) | {"exportable": False}
        return {"key": jwk, "attributes": attributes, "tags": {}}

    def _crypt(self, base: str, name: str, version: KeyVersion, operation: str, body: Any) -> Any:
        if not version.enabled:
            raise _vault_error(
                403, "Forbidden", f"Operation {operation} is not allowed on a disabled key.", "KeyDisabled"
            )
        if operation not in version.key_ops:
            raise _vault_error(
                403,
                "Forbidden",
                f"Operation {operation} is not permitted on this key.",
                "KeyOperationForbidden",
            )
        if not isinstance(body, dict) or not isinstance(body.get("value"), str) or "alg" not in body:
            raise _vault_error(
                400, "BadParameter", "Property 'value' is required.\r\nProperty 'alg' is required."
            )
        algorithm = ALGORITHMS.get(body["alg"])
        if algorithm is None or not isinstance(version.private_key, rsa.RSAPrivateKey):
            raise _vault_error(
                400, "BadParameter", f"Algorithm '{body['alg']}' is not supported with this key."
            )
        try:
            value = unb64url(body["value"])
        except ValueError:
            raise _vault_error(400, "BadParameter", "Content of 'value' is not base64url.") from None
        if operation == "encrypt":
            result = version.private_key.public_key().encrypt(value, algorithm)
        else:
            try:
                result = version.private_key.decrypt(value, algorithm)
            except ValueError:
                raise _vault_error(
                    400, "BadParameter", "Error occurred while decoding OAEP padding."
                ) from None
        return {"kid": f"{base}/keys/{name}/{version.version}", "value": b64url(result)}

    def _certificate(
        self, name: str, version: str | None, missing: str = "CertificateNotFound"
    ) -> CertificateVersion:
        for candidate in reversed(self.certificates.get(name, [])):
            if not version or candidate.version == version:
                return candidate
        kind = "certificate" if missing == "CertificateNotFound" else "secret"
        raise _vault_error(404, missing, f"A {kind} with (name/id) {name} was not found in this key vault.")

    def _certificate_bundle(self, base: str, name: str, cert: CertificateVersion) -> Any:
        der = cert.certificate.public_bytes(serialization.Encoding.DER)
        return {
            "id": f"{base}/certificates/{name}/{cert.version}",
            "kid": f"{base}/keys/{name}/{cert.version}",
            "sid": f"{base}/secrets/{name}/{cert.version}",
            "x5t": b64url(hashlib.sha1(der).digest()),  # Key Vault's thumbprint is SHA-1
            "cer": base64.b64encode(der).decode(),
            "attributes": _attributes(cert.created, True) | {"recoveryLevel": "Recoverable+Purgeable"},
            "policy": {
                "id": f"{base}/certificates/{name}/policy",
                "key_props": {"exportable": True, "kty": "RSA", "key_size": 2048, "reuse_key": False},
                "secret_props": {"contentType": cert.content_type},
                "x509_props": {"subject": f"CN={name}", "validity_months": 12},
                "issuer": {"name": "Self"},
                "attributes": _attributes(cert.created, True),
            },
            "tags": {},
        }

    # -- dispatch -----------------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: Any, body: bytes) -> tuple[int, Any, dict[str, str]]:
        host = headers.get("Host", f"127.0.0.1:{self.port}")
        base = f"https://{host}"
        parts = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        path = parts.path.split("/")[1:]
        authorized = bool(headers.get("Authorization"))
        try:
            match (method, path):
                case ("GET", [tenant, "v2.0", ".well-known", "openid-configuration"]):
                    result = self._openid_configuration(base, tenant)
                case ("POST", [tenant, "oauth2", "v2.0", "token"]):
                    form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
                    result = self._token(tenant, form)
                case ("GET", ["msi", "token"]):
                    result = self._managed_identity_token(headers, query)
                case (_, ["keys" | "certificates" | "secrets", *_]):
                    if "api-version" not in query:
                        raise _vault_error(
                            400, "BadParameter", "The api-version query parameter is required."
                        )
                    identity = self._authenticate(host, base, headers.get("Authorization"))
                    payload = json.loads(body) if body else None
                    result = self._vault(method, base, path, identity, payload)
                case _:
                    raise _Reply(
                        404, {"error": {"code": "NotFound", "message": f"no route for {parts.path}"}}
                    )
            status, extra = 200, {}
        except _Reply as reply:
            status, result, extra = reply.status, reply.body, reply.headers
        with self._lock:
            self.seen.append(Seen(method, parts.path, authorized, status))
        return status, result, extra


def _attributes(created: int, enabled: bool) -> dict[str, Any]:
    return {
        "enabled": enabled,
        "created": created,
        "updated": created,
        "recoveryLevel": "Recoverable+Purgeable",
        "recoverableDays": 90,
    }


def _aad_error(error: str, code: int, description: str) -> dict[str, Any]:
    trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return {
        "error": error,
        "error_description": f"AADSTS{code}: {description} Trace ID: {trace} Correlation ID: {correlation} "
        f"Timestamp: {now}",
        "error_codes": [code],
        "timestamp": now,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }


class _TlsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
        standin: KeyVaultStandIn,
    ) -> None:
        super().__init__(address, handler)
        self.context = context
        self.standin = standin
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake happens here, in the connection's own thread, so a slow client blocks no one.
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with self._open_lock:
            self._open.add(tls)  # wrap_socket took over the file descriptor: this is the one to cut
        try:
            super().finish_request(tls, client_address)
        finally:
            with self._open_lock:
                self._open.discard(tls)

    def cut_connections(self) -> None:
        with self._open_lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TlsServer
    timeout = 30

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, result, extra = self.server.standin.handle(self.command, self.path, self.headers, body)
        payload = json.dumps(result).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        return None


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def azure_keyvault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyVaultStandIn]:
    standin = KeyVaultStandIn(tmp_path_factory.mktemp("azure-keyvault")).start()
    yield standin
    standin.stop()


def _common_env(standin: KeyVaultStandIn, section: str, app: Identity) -> dict[str, str]:
    prefix = f"keyConnectorSettings__{section}__"
    assert app.secret is not None
    return {
        prefix + "azureKeyvaultUri": standin.url + "/",
        prefix + "azureKeyvaultAdTenantId": standin.tenant_id,
        prefix + "azureKeyvaultAdAppId": app.client_id,
        prefix + "azureKeyvaultAdSecret": app.secret,
        prefix + "azureKeyvaultAuthorityHost": standin.url,
        prefix + "azureKeyvaultCaBundle": str(standin.ca_bundle),
    }


@pytest.fixture
def azurekv_key_provider(azure_keyvault: KeyVaultStandIn) -> ProviderEnv:
    """A fresh RSA key and app registration on the session stand-in: ``rsaKey.provider=azurekv``."""
    app = azure_keyvault.add_app()
    name = azure_keyvault.add_rsa_key()
    env = {
        "keyConnectorSettings__rsaKey__provider": "azurekv",
        "keyConnectorSettings__rsaKey__azureKeyvaultKeyName": name,
        **_common_env(azure_keyvault, "rsaKey", app),
    }
    assert app.secret is not None
    return ProviderEnv(env=env, endpoint=("127.0.0.1", azure_keyvault.port), secrets=(app.secret,))


@pytest.fixture
def azurekv_certificate_provider(azure_keyvault: KeyVaultStandIn) -> ProviderEnv:
    """A fresh certificate (PFX secret) on the session stand-in, used by ``rsaKey.provider=certificate``."""
    app = azure_keyvault.add_app()
    name, _, _ = azure_keyvault.add_certificate()
    env = {
        "keyConnectorSettings__rsaKey__provider": "certificate",
        "keyConnectorSettings__certificate__provider": "azurekv",
        "keyConnectorSettings__certificate__azureKeyvaultCertificateName": name,
        **_common_env(azure_keyvault, "certificate", app),
    }
    assert app.secret is not None
    return ProviderEnv(env=env, endpoint=("127.0.0.1", azure_keyvault.port), secrets=(app.secret,))
