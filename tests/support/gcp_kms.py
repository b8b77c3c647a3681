"""A stand-in for Google Cloud KMS, driven by the official client over real gRPC and real OAuth2.

Google ships no KMS emulator, so this is a gRPC server on 127.0.0.1 (TLS under a certificate
authority made here) that answers ``GetPublicKey`` and ``AsymmetricDecrypt`` of
``google.cloud.kms.v1.KeyManagementService`` with google-cloud-kms's own message types, holds
RSA keys made with ``cryptography``, fills the CRC32C fields as KMS does and answers KMS's status
codes (NOT_FOUND, FAILED_PRECONDITION, INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED).

Authentication is real too: every call must carry ``authorization: Bearer <token>`` with a token
that the stand-in's OAuth2 token endpoint issued, and that endpoint grants tokens only for the
service-account JWT-bearer assertions google-auth sends, signature checked against the service
account's public key. Tests write a service-account key file pointing at that endpoint and set
``GOOGLE_APPLICATION_CREDENTIALS``, so application default credentials run end to end.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.cloud import kms_v1

from keyconnector.devtools import free_port
from keyconnector.devtools.tls import local_tls_files
from tests.support.providers import ProviderEnv

SERVICE = "google.cloud.kms.v1.KeyManagementService"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
KMS_SCOPES = {"https://www.googleapis.com/auth/cloudkms", "https://www.googleapis.com/auth/cloud-platform"}
PROJECT = "kc-test-project"
LOCATION = "europe-west1"
KEYRING = "key-connector"
Algorithm = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm
_NAME = re.compile(
    r"projects/([^/]+)/locations/([^/]+)/keyRings/([^/]+)/cryptoKeys/([^/]+)/cryptoKeyVersions/([^/]+)"
)
_OAEP = re.compile(r"RSA_DECRYPT_OAEP_(\d+)_(SHA1|SHA256|SHA512)")
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "SHA1": hashes.SHA1,
    "SHA256": hashes.SHA256,
    "SHA512": hashes.SHA512,
}


def crc32c(data: bytes) -> int:
    """Bit by bit, deliberately not the provider's table-driven code, so that each checks the other."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """``context.abort`` raises to end the call; saying so lets the type checker follow."""
    context.abort(code, details)
    raise AssertionError("grpc's abort returned")


def oaep(hash_name: str) -> padding.OAEP:
    hash_type = _HASHES[hash_name]
    return padding.OAEP(mgf=padding.MGF1(hash_type()), algorithm=hash_type(), label=None)


# --------------------------------------------------------------------------------------------------
# Service accounts and the token endpoint


@dataclass
class ServiceAccount:
    email: str
    private_key: rsa.RSAPrivateKey
    key_id: str
    access_token: str
    """What the token endpoint grants this account (chosen up front so that tests can look for it)."""

    @property
    def private_key_pem(self) -> str:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()

    @property
    def secret_fragment(self) -> str:
        """One base64 line of the private key: found in a log whether the PEM was escaped or not."""
        return self.private_key_pem.splitlines()[5]

    def key_file(self, path: Path, token_uri: str, private_key: rsa.RSAPrivateKey | None = None) -> Path:
        """The JSON key file Google hands out for a service account, pointing at our token endpoint."""
        key = private_key or self.private_key
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        document = {
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": self.key_id,
            "private_key": pem,
            "client_email": self.email,
            "client_id": str(secrets.randbelow(10**20)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "universe_domain": "googleapis.com",
        }
        path.write_text(json.dumps(document, indent=2), encoding="utf-8")
        return path


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


class _TokenHandler(BaseHTTPRequestHandler):
    stand_in: KmsStandIn

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _answer(self, status: int, document: dict[str, Any]) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        if self.path != "/token":
            self._answer(404, {"error": "not_found"})
            return
        status, document = self.stand_in.grant(form)
        self._answer(status, document)


# --------------------------------------------------------------------------------------------------
# The KMS stand-in


@dataclass
class KeyVersion:
    name: str
    algorithm: str
    private_key: rsa.RSAPrivateKey | None
    state: str = "ENABLED"
    fault: str | None = None
    """``pem_crc32c``, ``plaintext_crc32c`` or ``unverified``: a response corrupted in transit."""

    @property
    def key_name(self) -> str:
        return self.name.rsplit("/cryptoKeyVersions/", 1)[0]

    @property
    def public_pem(self) -> str:
        assert self.private_key is not None
        return (
            self.private_key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    @property
    def ids(self) -> tuple[str, str, str, str, str]:
        match = _NAME.fullmatch(self.name)
        assert match is not None
        project, location, keyring, key, version = match.groups()
        return project, location, keyring, key, version


@dataclass(frozen=True)
class Call:
    method: str
    caller: str
    resource: str


@dataclass
class KmsStandIn:
    folder: Path
    port: int = field(default_factory=free_port)
    token_port: int = field(default_factory=free_port)
    versions: dict[str, KeyVersion] = field(default_factory=dict)
    accounts: dict[str, ServiceAccount] = field(default_factory=dict)
    denied: set[str] = field(default_factory=set)
    calls: list[Call] = field(default_factory=list)
    grants: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}
        tls = local_tls_files(self.folder, "Key Connector test CA")
        self.ca_path = tls.ca
        self._server_credentials = grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.certificate.read_bytes())]
        )
        self._server: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None

    # ---- lifecycle

    def __enter__(self) -> KmsStandIn:
        self.start_token_endpoint()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def start(self) -> None:
        """Start (or restart, on the same port and with the same keys) the gRPC server."""
        handlers = {
            "GetPublicKey": grpc.unary_unary_rpc_method_handler(
                self._get_public_key,
                request_deserializer=kms_v1.GetPublicKeyRequest.deserialize,
                response_serializer=kms_v1.PublicKey.serialize,
            ),
            "AsymmetricDecrypt": grpc.unary_unary_rpc_method_handler(
                self._asymmetric_decrypt,
                request_deserializer=kms_v1.AsymmetricDecryptRequest.deserialize,
                response_serializer=kms_v1.AsymmetricDecryptResponse.serialize,
            ),
        }
        # No SO_REUSEPORT: two servers must never share a port by accident.
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        if server.add_secure_port(f"127.0.0.1:{self.port}", self._server_credentials) == 0:
            raise RuntimeError(f"the KMS stand-in cannot listen on 127.0.0.1:{self.port}")
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def start_token_endpoint(self) -> None:
        handler = type("TokenHandler", (_TokenHandler,), {"stand_in": self})
        self._http = ThreadingHTTPServer(("127.0.0.1", self.token_port), handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"http://127.0.0.1:{self.token_port}/token"

    # ---- what tests set up

    def new_service_account(self) -> ServiceAccount:
        account = ServiceAccount(
            email=f"kc-{secrets.token_hex(4)}@{PROJECT}.iam.gserviceaccount.com",
            private_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
            key_id=secrets.token_hex(20),
            access_token="ya29.stand-in-" + secrets.token_urlsafe(24),
        )
        with self._lock:
            self.accounts[account.email] = account
        return account

    def create_key(
        self,
        algorithm: str = "RSA_DECRYPT_OAEP_2048_SHA256",
        *,
        key_id: str | None = None,
        keyring: str = KEYRING,
    ) -> KeyVersion:
        """A new key with its first version (``GOOGLE_SYMMETRIC_ENCRYPTION`` holds no RSA key)."""
        key_id = key_id or "kc-" + secrets.token_hex(6)
        private_key = None
        if algorithm.startswith("RSA_"):
            bits = int(re.findall(r"_(\d{4})", algorithm)[0])
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        getattr(Algorithm, algorithm)  # a name KMS knows
        key_name = f"projects/{PROJECT}/locations/{LOCATION}/keyRings/{keyring}/cryptoKeys/{key_id}"
        name = f"{key_name}/cryptoKeyVersions/1"
        version = KeyVersion(name, algorithm, private_key)
        with self._lock:
            self.versions[name] = version
        return version

    def env(self, version: KeyVersion, key_file: Path) -> dict[str, str]:
        project, location, keyring, key, number = version.ids
        prefix = "keyConnectorSettings__rsaKey__"
        return {
            prefix + "provider": "gcpkms",
            prefix + "googleCloudProjectId": project,
            prefix + "googleCloudLocationId": location,
            prefix + "googleCloudKeyringId": keyring,
            prefix + "googleCloudKeyId": key,
            prefix + "googleCloudKeyVersionId": number,
            prefix + "googleCloudEndpoint": self.endpoint,
            prefix + "googleCloudCaBundle": str(self.ca_path),
            "GOOGLE_APPLICATION_CREDENTIALS": str(key_file),
        }

    def calls_to(self, resource: str) -> list[Call]:
        with self._lock:
            return [call for call in self.calls if call.resource == resource]

    # ---- OAuth2

    def grant(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        """The JWT-bearer grant (RFC 7523) as Google's token endpoint answers it."""
        if form.get("grant_type") != [JWT_BEARER]:
            return 400, {"error": "unsupported_grant_type", "error_description": "Invalid grant_type."}
        assertion = (form.get("assertion") or [""])[0]
        try:
            header_b64, payload_b64, signature_b64 = assertion.split(".")
            header = json.loads(_b64url(header_b64))
            claims = json.loads(_b64url(payload_b64))
            signature = _b64url(signature_b64)
        except ValueError:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT: malformed."}
        with self._lock:
            account = self.accounts.get(str(claims.get("iss")))
        if account is None or header.get("alg") != "RS256":
            return 400, {"error": "invalid_grant", "error_description": "Invalid grant: account not found"}
        try:
            account.private_key.public_key().verify(
                signature, f"{header_b64}.{payload_b64}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        now = time.time()
        if claims.get("aud") not in (GOOGLE_TOKEN_AUDIENCE, self.token_uri):
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT: audience."}
        if not (claims.get("iat", 0) - 300 <= now < claims.get("exp", 0) <= claims.get("iat", 0) + 3600):
            return 400, {
                "error": "invalid_grant",
                "error_description": "Invalid JWT: Token must be a short-lived token.",
            }
        if not KMS_SCOPES & set(str(claims.get("scope", "")).split()):
            return 400, {"error": "invalid_scope", "error_description": "No KMS scope was requested."}
        with self._lock:
            self._tokens[account.access_token] = (account.email, now + 3600)
            self.grants.append(account.email)
        return 200, {"access_token": account.access_token, "expires_in": 3599, "token_type": "Bearer"}

    def _caller(self, method: str, resource: str, context: grpc.ServicerContext) -> str:
        metadata = dict(context.invocation_metadata())
        authorization = str(metadata.get("authorization", ""))
        scheme, _, token = authorization.partition(" ")
        with self._lock:
            entry = self._tokens.get(token) if scheme.lower() == "bearer" else None
        if entry is None or entry[1] < time.time():
            with self._lock:
                self.refused.append(method)
            _abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
                "or other valid authentication credential.",
            )
        email = entry[0]
        with self._lock:
            denied = email in self.denied
            self.calls.append(Call(method, email, resource))
        if denied:
            permission = "viewPublicKey" if method == "GetPublicKey" else "useToDecrypt"
            _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"Permission 'cloudkms.cryptoKeyVersions.{permission}' denied on resource '{resource}' "
                "(or it may not exist).",
            )
        return email

    def _version(self, name: str, context: grpc.ServicerContext) -> KeyVersion:
        match = _NAME.fullmatch(name)
        if match is None:
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Resource name [{name}] does not match any known resource name pattern.",
            )
        project, location, keyring, key, _ = match.groups()
        keyring_name = f"projects/{project}/locations/{location}/keyRings/{keyring}"
        key_name = f"{keyring_name}/cryptoKeys/{key}"
        with self._lock:
            version = self.versions.get(name)
            names = list(self.versions)
        if version is not None:
            return version
        if not any(other.startswith(keyring_name + "/") for other in names):
            _abort(context, grpc.StatusCode.NOT_FOUND, f"KeyRing {keyring_name} not found.")
        if not any(other.startswith(key_name + "/") for other in names):
            _abort(context, grpc.StatusCode.NOT_FOUND, f"CryptoKey {key_name} not found.")
        _abort(context, grpc.StatusCode.NOT_FOUND, f"CryptoKeyVersion {name} not found.")

    def _usable(self, version: KeyVersion, context: grpc.ServicerContext) -> None:
        if version.private_key is None:
            _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{version.key_name} has algorithm {version.algorithm} and purpose ENCRYPT_DECRYPT; "
                "the operation requires an asymmetric key.",
            )
        if version.state != "ENABLED":
            _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{version.name} is not enabled, current state is: {version.state}.",
            )

    def _get_public_key(
        self, request: kms_v1.GetPublicKeyRequest, context: grpc.ServicerContext
    ) -> kms_v1.PublicKey:
        self._caller("GetPublicKey", request.name, context)
        version = self._version(request.name, context)
        self._usable(version, context)
        pem = version.public_pem
        checksum = crc32c(pem.encode())
        if version.fault == "pem_crc32c":
            checksum ^= 1
        return kms_v1.PublicKey(
            pem=pem,
            pem_crc32c=checksum,
            algorithm=getattr(Algorithm, version.algorithm),
            name=version.name,
            protection_level=kms_v1.ProtectionLevel.SOFTWARE,
        )

    def _asymmetric_decrypt(
        self, request: kms_v1.AsymmetricDecryptRequest, context: grpc.ServicerContext
    ) -> kms_v1.AsymmetricDecryptResponse:
        self._caller("AsymmetricDecrypt", request.name, context)
        version = self._version(request.name, context)
        self._usable(version, context)
        match = _OAEP.fullmatch(version.algorithm)
        if match is None:
            _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{version.key_name} has algorithm {version.algorithm}; AsymmetricDecrypt requires purpose "
                "ASYMMETRIC_DECRYPT.",
            )
        checked = "ciphertext_crc32c" in request
        if checked and request.ciphertext_crc32c != crc32c(request.ciphertext):
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "The checksum in field ciphertext_crc32c did not match the data in field ciphertext.",
            )
        assert version.private_key is not None
        try:
            plaintext = version.private_key.decrypt(request.ciphertext, oaep(match.group(2)))
        except ValueError:
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "Decryption failed: verify that 'name' refers to the correct CryptoKey.",
            )
        checksum = crc32c(plaintext)
        if version.fault == "plaintext_crc32c":
            checksum ^= 1
        return kms_v1.AsymmetricDecryptResponse(
            plaintext=plaintext,
            plaintext_crc32c=checksum,
            verified_ciphertext_crc32c=checked and version.fault != "unverified",
            protection_level=kms_v1.ProtectionLevel.SOFTWARE,
        )


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def gcp_kms_stand_in(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStandIn]:
    with KmsStandIn(tmp_path_factory.mktemp("gcp-kms")) as stand_in:
        yield stand_in


@pytest.fixture
def gcpkms_provider(gcp_kms_stand_in: KmsStandIn, tmp_path: Path) -> ProviderEnv:
    """A fresh key version and a fresh service account on the session stand-in."""
    account = gcp_kms_stand_in.new_service_account()
    version = gcp_kms_stand_in.create_key()
    key_file = account.key_file(tmp_path / "gcp-service-account.json", gcp_kms_stand_in.token_uri)
    return ProviderEnv(
        env=gcp_kms_stand_in.env(version, key_file),
        endpoint=("127.0.0.1", gcp_kms_stand_in.port),
        secrets=(account.access_token, account.secret_fragment),
    )
