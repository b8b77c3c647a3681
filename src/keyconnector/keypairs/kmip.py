"""The ``kmip`` provider (ours): the key lives in a KMIP key manager and never leaves it.

Two kinds of key, told apart by the object the key manager holds under ``kmipKeyId`` (or
``kmipKeyName``):

* an RSA **private key**: ``wrap`` is RSA-OAEP-SHA-256 with its public key, done here (the public key
  is fetched once, through the private key's Link or ``kmipPublicKeyId``/``kmipPublicKeyName``);
  ``unwrap`` is the key manager's ``Decrypt``. The wrap is a plain OAEP ciphertext, so any provider
  holding the same key pair finds it again by the usual RSA fingerprint.
* an AES **symmetric key**: ``wrap`` and ``unwrap`` are the key manager's ``Encrypt`` and ``Decrypt``
  in AES-GCM, with a nonce made here and a fixed associated data, stored as
  ``KMIP`` ``\\x01`` | nonce (12) | tag (16) | ciphertext.

The service never asks for the private or symmetric key (no ``Get`` on it), only for operations
with it. Mutual TLS is how KMIP clients authenticate: ``kmipClientCertificate`` and ``kmipClientKey``;
the server's certificate is checked against the deployment's trust store (or ``kmipCaBundle``)
*and its host name*, which PyKMIP's own client does not do. ``kmipUsername``/``kmipPassword``
add a KMIP credential for key managers that want one.

PyKMIP's client is synchronous and one connection is one socket: requests are serialised on a lock
and run in a thread; a broken connection is dropped and the request retried once on a new one
(Encrypt, Decrypt, Get and Locate have no side effects), so a key manager restart is invisible and
an outage is an ``UnavailableError`` until it comes back, without a restart of the service.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keyconnector._optional import require
from keyconnector.certificates import check_key_size
from keyconnector.errors import (
    ConfigurationError,
    IntegrityFailure,
    KeyConnectorError,
    UnavailableError,
    setting_name,
)
from keyconnector.keypairs.base import OAEP_SHA256, rsa_fingerprint
from keyconnector.runtime.settings import RsaKeySettings, SideSettings, secret

PROVIDER = "kmip"
TIMEOUT = 10.0
"""Seconds for connecting and for each answer: a key manager that does not answer is an outage."""
MAGIC = b"KMIP\x01"
NONCE_SIZE = 12
TAG_SIZE = 16
AAD = b"keyconnector data key"
"""Associated data of the AES-GCM wrap: a ciphertext made by this key for another purpose does not
pass for a wrapped data key."""


_NOT_OURS = ("CRYPTOGRAPHIC_FAILURE", "INVALID_FIELD", "INVALID_MESSAGE", "GENERAL_FAILURE")
"""Result reasons of a Decrypt that mean the ciphertext is not this key's: key managers differ in
which one a failed OAEP decoding or GCM tag gets (PyKMIP's answers a wrong tag with a general
failure). The key was read and checked at start, so these do not hide a missing key."""


@dataclass(frozen=True)
class _Target:
    prefix: str
    host: str
    port: int
    certificate: str
    key: str
    ca_bundle: str
    key_id: str | None
    key_name: str | None
    public_key_id: str | None
    public_key_name: str | None
    username: str | None
    password: str | None

    def setting(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    @property
    def key_setting(self) -> str:
        return self.setting("kmipKeyId" if self.key_id else "kmipKeyName")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _readable_file(value: str | None, setting: str, what: str) -> str:
    path = (value or "").strip()
    if not path:
        raise ConfigurationError(setting, f"is not set; it is the PEM file of {what}")
    if not Path(path).is_file():
        raise ConfigurationError(setting, f"{path} does not exist or is not a file; it should be {what}")
    if not os.access(path, os.R_OK):
        raise ConfigurationError(setting, f"{path} is not readable by this process; it is {what}")
    return path


def _target(side: SideSettings, rsa_settings: RsaKeySettings, prefix: str) -> _Target:
    host = (rsa_settings.kmip_server_host or "").strip()
    if not host:
        raise ConfigurationError(
            f"{prefix}.kmipServerHost", "is not set; it is the KMIP key manager's host name"
        )
    if not 0 < rsa_settings.kmip_server_port < 65536:
        raise ConfigurationError(
            f"{prefix}.kmipServerPort", f"{rsa_settings.kmip_server_port} is not a TCP port (1-65535)"
        )
    certificate = _readable_file(
        rsa_settings.kmip_client_certificate,
        f"{prefix}.kmipClientCertificate",
        "the client certificate the key manager knows this service by",
    )
    key = _readable_file(
        rsa_settings.kmip_client_key, f"{prefix}.kmipClientKey", "the client certificate's private key"
    )
    key_id = (rsa_settings.kmip_key_id or "").strip() or None
    key_name = (rsa_settings.kmip_key_name or "").strip() or None
    if key_id and key_name:
        raise ConfigurationError(
            f"{prefix}.kmipKeyName",
            f"is set together with {setting_name(prefix + '.kmipKeyId')}; give only one of them",
        )
    if not key_id and not key_name:
        raise ConfigurationError(
            f"{prefix}.kmipKeyId",
            "is not set; give the key's unique identifier, or its name in "
            f"{setting_name(prefix + '.kmipKeyName')}",
        )
    public_key_id = (rsa_settings.kmip_public_key_id or "").strip() or None
    public_key_name = (rsa_settings.kmip_public_key_name or "").strip() or None
    if public_key_id and public_key_name:
        raise ConfigurationError(
            f"{prefix}.kmipPublicKeyName",
            f"is set together with {setting_name(prefix + '.kmipPublicKeyId')}; give only one of them",
        )
    username = (rsa_settings.kmip_username or "").strip() or None
    password = secret(rsa_settings.kmip_password) or None
    if password and not username:
        raise ConfigurationError(
            f"{prefix}.kmipUsername", "is not set, but kmipPassword is; a KMIP credential needs both"
        )
    if username and not password:
        raise ConfigurationError(
            f"{prefix}.kmipPassword", "is not set, but kmipUsername is; a KMIP credential needs both"
        )
    ca_bundle = side.trust().bundle_file(rsa_settings.kmip_ca_bundle, f"{prefix}.kmipCaBundle")
    return _Target(
        prefix=prefix,
        host=host,
        port=rsa_settings.kmip_server_port,
        certificate=certificate,
        key=key,
        ca_bundle=ca_bundle,
        key_id=key_id,
        key_name=key_name,
        public_key_id=public_key_id,
        public_key_name=public_key_name,
        username=username,
        password=password,
    )


def _tls_context(target: _Target) -> ssl.SSLContext:
    """Verifies the key manager's certificate and host name, and presents the client certificate."""
    context = ssl.create_default_context(cafile=target.ca_bundle)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(target.certificate, target.key)
    except ssl.SSLError as exc:
        raise ConfigurationError(
            target.setting("kmipClientKey"),
            f"does not load with {setting_name(target.setting('kmipClientCertificate'))} "
            f"({exc.reason or exc}); "
            "give an unencrypted PEM private key that matches the certificate",
        ) from None
    return context


class _Refused(Exception):
    """The key manager answered with a failure result."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class _Connection:
    """One KMIP connection, opened on demand, used by one thread at a time."""

    def __init__(self, target: _Target, context: ssl.SSLContext) -> None:
        self._target = target
        self._context = context
        self._lock = threading.Lock()
        self._kmip: Any = require("kmip", extra="kmip", setting=target.setting("provider"), provider=PROVIDER)
        from kmip.core import enums
        from kmip.core import exceptions as kmip_exceptions
        from kmip.services.kmip_client import KMIPProxy

        self.enums = enums
        self._operation_failure = kmip_exceptions.OperationFailure
        self._proxy_class = KMIPProxy
        self._proxy: Any = None

    def _open(self) -> Any:
        target, context = self._target, self._context

        class _Proxy(self._proxy_class):  # type: ignore[name-defined,misc]
            def _create_socket(self, sock: socket.socket) -> None:
                self.socket = context.wrap_socket(sock, server_hostname=target.host)
                self.socket.settimeout(TIMEOUT)

        proxy = _Proxy(
            host=target.host,
            port=target.port,
            username=target.username,
            password=target.password,
            timeout=TIMEOUT,
            config_file=os.devnull,
            kmip_version=self.enums.KMIPVersion.KMIP_1_4,
        )
        sock = socket.create_connection((target.host, target.port), timeout=TIMEOUT)
        try:
            proxy._create_socket(sock)
        except BaseException:
            sock.close()
            raise
        from kmip.services.kmip_protocol import KMIPProtocol

        proxy.protocol = KMIPProtocol(proxy.socket)
        return proxy

    def request(self, operation: Any, payload: Any) -> Any:
        """Send one request; a connection that broke is replaced and the request sent once more."""
        with self._lock:
            for attempt in (1, 2):
                fresh = self._proxy is None
                try:
                    if self._proxy is None:
                        self._proxy = self._open()
                    return self._proxy.send_request_payload(operation, payload)
                except self._operation_failure as exc:
                    raise _Refused(getattr(exc.reason, "name", "UNKNOWN"), str(exc)) from None
                except ssl.SSLCertVerificationError:
                    self._drop()
                    raise
                except ssl.SSLError as exc:
                    self._drop()
                    if "ALERT" in str(exc.reason or ""):
                        raise  # the key manager refused this client certificate
                    if fresh or attempt == 2:
                        raise ConnectionError(str(exc) or type(exc).__name__) from None
                except (OSError, EOFError, ValueError, AttributeError) as exc:
                    # A reset, a timeout, or PyKMIP reading a half-closed socket (it raises ValueError
                    # or AttributeError on a short read): the connection is gone.
                    self._drop()
                    if fresh or attempt == 2:
                        raise ConnectionError(str(exc) or type(exc).__name__) from None
            raise AssertionError("unreachable")

    def _drop(self) -> None:
        proxy, self._proxy = self._proxy, None
        if proxy is not None:
            proxy.close()

    def close(self) -> None:
        with self._lock:
            self._drop()


class KmipKeyProvider:
    def __init__(self, target: _Target, connection: _Connection) -> None:
        self._target = target
        self._connection = connection
        self._component = f"the key provider kmip ({setting_name(target.setting('kmipServerHost'))})"
        self._opened = False
        self._uid = ""
        self._symmetric = False
        self._description = ""
        self.public_key: rsa.RSAPublicKey | None = None
        """The RSA key's public half, for wraps done here; None for an AES key."""

    @property
    def description(self) -> str:
        return self._description

    @property
    def fingerprint(self) -> str:
        if self.public_key is not None:
            return rsa_fingerprint(self.public_key, "rsa-oaep-sha256")
        return f"kmip:{self._target.address}/{self._uid}:aes-gcm"

    # -- requests --------------------------------------------------------------------------------------

    async def _request(self, doing: str, operation: Any, payload: Any) -> Any:
        try:
            return await asyncio.to_thread(self._connection.request, operation, payload)
        except ssl.SSLCertVerificationError as exc:
            raise self._config_error(
                self._target.setting("kmipCaBundle"),
                f"cannot connect to {self._target.address}: the key manager's TLS certificate is not trusted "
                f"({exc.verify_message}); give the CA that signed it in this setting or as a .crt file in "
                "the CA certificates directory",
            ) from None
        except ssl.SSLError as exc:
            raise self._config_error(
                self._target.setting("kmipClientCertificate"),
                f"the TLS handshake with {self._target.address} failed ({exc.reason or exc}); does the key "
                "manager accept this client certificate?",
            ) from None
        except (ConnectionError, OSError) as exc:
            raise UnavailableError(
                self._component, f"cannot {doing} at {self._target.address}: {exc}"
            ) from None

    def _config_error(self, setting: str, problem: str) -> KeyConnectorError:
        """Fatal while opening; once running, an outage until someone fixes it."""
        if not self._opened:
            return ConfigurationError(setting, problem)
        return UnavailableError(self._component, f"{setting_name(setting)}: {problem}")

    def _refusal(self, exc: _Refused, doing: str, setting: str) -> KeyConnectorError:
        if exc.reason == "ITEM_NOT_FOUND":
            return self._config_error(setting, f"the key manager has no such object ({doing}: {exc.message})")
        if exc.reason in ("PERMISSION_DENIED", "AUTHENTICATION_NOT_SUCCESSFUL"):
            credential = "kmipUsername" if self._target.username else "kmipClientCertificate"
            return self._config_error(
                self._target.setting(credential),
                f"the key manager refused to {doing} ({exc.reason}: {exc.message}); is the object this "
                "client's, with a usage mask that allows it, and active?",
            )
        return UnavailableError(
            self._component, f"the key manager refused to {doing} ({exc.reason}: {exc.message})"
        )

    # -- opening ---------------------------------------------------------------------------------------

    async def _locate(self, name: str, setting: str) -> str:
        from kmip.core.factories.attributes import AttributeFactory
        from kmip.core.messages import payloads

        attribute = AttributeFactory().create_attribute(self._connection.enums.AttributeType.NAME, name)
        try:
            found = await self._request(
                "locate the key",
                self._connection.enums.Operation.LOCATE,
                payloads.LocateRequestPayload(attributes=[attribute]),
            )
        except _Refused as exc:
            raise self._refusal(exc, f"locate '{name}'", setting) from None
        ids = list(found.unique_identifiers or [])
        if not ids:
            raise ConfigurationError(
                setting, f"no object named '{name}' on the key manager at {self._target.address}"
            )
        if len(ids) > 1:
            raise ConfigurationError(
                setting,
                f"{len(ids)} objects are named '{name}' on {self._target.address} ({', '.join(ids)}); "
                "give the key's unique identifier instead",
            )
        return str(ids[0])

    async def _attributes(self, uid: str, setting: str, names: list[str]) -> dict[str, list[Any]]:
        from kmip.core.messages import payloads

        try:
            answer = await self._request(
                "read the key's attributes",
                self._connection.enums.Operation.GET_ATTRIBUTES,
                payloads.GetAttributesRequestPayload(unique_identifier=uid, attribute_names=names),
            )
        except _Refused as exc:
            raise self._refusal(exc, f"read the attributes of '{uid}'", setting) from None
        values: dict[str, list[Any]] = {}
        for attribute in answer.attributes or []:
            values.setdefault(attribute.attribute_name.value, []).append(attribute.attribute_value)
        return values

    async def _open(self) -> None:
        target, enums = self._target, self._connection.enums
        setting = target.key_setting
        self._uid = target.key_id or await self._locate(target.key_name or "", setting)
        attributes = await self._attributes(
            self._uid,
            setting,
            ["Object Type", "Cryptographic Algorithm", "Cryptographic Length", "State", "Link"],
        )
        object_type = _value(attributes, "Object Type")
        algorithm = _value(attributes, "Cryptographic Algorithm")
        state = _value(attributes, "State")
        if state is not None and state != enums.State.ACTIVE:
            raise ConfigurationError(
                setting, f"the key '{self._uid}' is {state.name}, not ACTIVE; activate it first"
            )
        if object_type == enums.ObjectType.SYMMETRIC_KEY and algorithm == enums.CryptographicAlgorithm.AES:
            self._symmetric = True
            kind = f"AES-{_value(attributes, 'Cryptographic Length') or '?'} key (server-side AES-GCM)"
        elif object_type == enums.ObjectType.PRIVATE_KEY and algorithm == enums.CryptographicAlgorithm.RSA:
            self.public_key = await self._public_key(attributes)
            kind = f"RSA-{self.public_key.key_size} private key (server-side OAEP-SHA-256 decryption)"
        else:
            shown = f"{getattr(object_type, 'name', object_type)} {getattr(algorithm, 'name', algorithm)}"
            raise ConfigurationError(
                setting,
                f"the object '{self._uid}' is a {shown}; the kmip provider needs an RSA private key or an "
                "AES "
                "symmetric key",
            )
        credential = f", username '{target.username}'" if target.username else ""
        self._description = f"KMIP {kind} '{self._uid}' at {target.address} (client certificate{credential})"
        self._opened = True

    async def _public_key(self, attributes: dict[str, list[Any]]) -> rsa.RSAPublicKey:
        from kmip.core.messages import payloads

        target, enums = self._target, self._connection.enums
        public_id: str | None = None
        for link in attributes.get("Link", []):
            if getattr(getattr(link, "link_type", None), "value", None) == enums.LinkType.PUBLIC_KEY_LINK:
                public_id = str(link.linked_object_identifier.value)
        setting = target.setting("kmipPublicKeyId" if target.public_key_id else "kmipPublicKeyName")
        if target.public_key_id:
            public_id = target.public_key_id
        elif target.public_key_name:
            public_id = await self._locate(target.public_key_name, setting)
        if public_id is None:
            raise ConfigurationError(
                target.setting("kmipPublicKeyId"),
                "is not set and the key manager keeps no link from the private key "
                f"'{self._uid}' to its public "
                f"key; give the public key's unique identifier, or its name in "
                f"{setting_name(target.setting('kmipPublicKeyName'))}",
            )
        try:
            answer = await self._request(
                "get the public key",
                enums.Operation.GET,
                payloads.GetRequestPayload(unique_identifier=public_id),
            )
        except _Refused as exc:
            raise self._refusal(exc, f"get the public key '{public_id}'", setting) from None
        try:
            material = answer.secret.key_block.key_value.key_material.value
            public = serialization.load_der_public_key(bytes(material))
        except (AttributeError, ValueError, TypeError):
            raise ConfigurationError(setting, f"the object '{public_id}' is not an RSA public key") from None
        if not isinstance(public, rsa.RSAPublicKey):
            raise ConfigurationError(setting, f"the object '{public_id}' is not an RSA public key")
        check_key_size(public, setting)
        return public

    # -- operations ------------------------------------------------------------------------------------

    def _parameters(self) -> Any:
        from kmip.core.attributes import CryptographicParameters

        enums = self._connection.enums
        if self._symmetric:
            return CryptographicParameters(
                block_cipher_mode=enums.BlockCipherMode.GCM,
                cryptographic_algorithm=enums.CryptographicAlgorithm.AES,
                tag_length=TAG_SIZE,
            )
        return CryptographicParameters(
            cryptographic_algorithm=enums.CryptographicAlgorithm.RSA,
            padding_method=enums.PaddingMethod.OAEP,
            hashing_algorithm=enums.HashingAlgorithm.SHA_256,
        )

    async def wrap(self, data_key: bytes) -> bytes:
        if self.public_key is not None:
            return self.public_key.encrypt(data_key, OAEP_SHA256)
        from kmip.core.messages import payloads

        nonce = secrets.token_bytes(NONCE_SIZE)
        request = payloads.EncryptRequestPayload(
            unique_identifier=self._uid,
            cryptographic_parameters=self._parameters(),
            data=data_key,
            iv_counter_nonce=nonce,
            auth_additional_data=AAD,
        )
        try:
            answer = await self._request("encrypt", self._connection.enums.Operation.ENCRYPT, request)
        except _Refused as exc:
            raise self._refusal(
                exc, f"encrypt with the key '{self._uid}'", self._target.key_setting
            ) from None
        tag = bytes(answer.auth_tag or b"")
        if len(tag) != TAG_SIZE or answer.iv_counter_nonce not in (None, nonce):
            raise UnavailableError(
                self._component, "the key manager's AES-GCM answer has no 16-byte tag for our nonce"
            )
        return MAGIC + nonce + tag + bytes(answer.data)

    async def unwrap(self, wrapped: bytes) -> bytes:
        from kmip.core.messages import payloads

        if self._symmetric:
            head = len(MAGIC) + NONCE_SIZE + TAG_SIZE
            if not wrapped.startswith(MAGIC) or len(wrapped) <= head:
                raise IntegrityFailure(
                    "the stored data key is not a KMIP AES-GCM wrap: it was wrapped by another key provider"
                )
            nonce, tag = (
                wrapped[len(MAGIC) : len(MAGIC) + NONCE_SIZE],
                wrapped[len(MAGIC) + NONCE_SIZE : head],
            )
            request = payloads.DecryptRequestPayload(
                unique_identifier=self._uid,
                cryptographic_parameters=self._parameters(),
                data=wrapped[head:],
                iv_counter_nonce=nonce,
                auth_additional_data=AAD,
                auth_tag=tag,
            )
        else:
            assert self.public_key is not None
            if len(wrapped) != self.public_key.key_size // 8:
                raise IntegrityFailure(
                    "the stored data key is not an RSA ciphertext for this "
                    f"{self.public_key.key_size}-bit key "
                    f"({len(wrapped)} bytes): it was wrapped by another key"
                )
            request = payloads.DecryptRequestPayload(
                unique_identifier=self._uid, cryptographic_parameters=self._parameters(), data=wrapped
            )
        try:
            answer = await self._request("decrypt", self._connection.enums.Operation.DECRYPT, request)
        except _Refused as exc:
            if exc.reason in _NOT_OURS:
                raise IntegrityFailure(
                    f"the KMIP key '{self._uid}' does not decrypt the stored data key ({exc.message}): "
                    "it was wrapped by another key"
                ) from None
            raise self._refusal(
                exc, f"decrypt with the key '{self._uid}'", self._target.key_setting
            ) from None
        return bytes(answer.data)

    async def check(self) -> None:
        probe = secrets.token_bytes(32)
        if await self.unwrap(await self.wrap(probe)) != probe:
            raise IntegrityFailure(f"{self.description} does not round-trip a wrapped key")

    async def aclose(self) -> None:
        await asyncio.to_thread(self._connection.close)


def _value(attributes: dict[str, list[Any]], name: str) -> Any:
    values = attributes.get(name) or []
    if not values:
        return None
    return getattr(values[0], "value", values[0])


async def open(side: SideSettings) -> KmipKeyProvider:
    rsa_settings = side.require_rsa_key()
    require("kmip", extra="kmip", setting=f"{side.rsa_key_prefix}.provider", provider=PROVIDER)
    target = _target(side, rsa_settings, side.rsa_key_prefix)
    connection = _Connection(target, _tls_context(target))
    provider = KmipKeyProvider(target, connection)
    try:
        await provider._open()
    except BaseException:
        connection.close()
        raise
    return provider
