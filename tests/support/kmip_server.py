"""PyKMIP's KMIP server for the tests, with RSA decryption enabled (``python kmip_server.py FOLDER PORT``).

PyKMIP's server speaks KMIP 1.x over TLS with client certificates, keeps its objects in SQLite and
implements Encrypt and Decrypt for symmetric keys. Its cryptographic engine can also decrypt with an
RSA private key (OAEP with SHA-1 or SHA-256), but the operation handler refuses anything but a
symmetric key and drops the hashing algorithm. The one change made here is that handler: a Decrypt
on a private key goes to the engine's RSA decryption, with the usage mask and state checks every
key manager applies. Everything else, the TLS, the client-certificate identity, the object store,
the access policies and the wire encoding, is PyKMIP's own.

The folder holds ``server.crt``, ``server.key`` and ``ca.crt``; the log and database go there too.
"""

from __future__ import annotations

import sys
from typing import Any

from kmip.core import enums, exceptions
from kmip.core.messages import payloads
from kmip.services.server import engine as kmip_engine
from kmip.services.server import server as kmip_server

_symmetric_decrypt = kmip_engine.KmipEngine._process_decrypt


def _process_decrypt(self: Any, payload: Any) -> Any:
    identifier = payload.unique_identifier or self._id_placeholder
    managed = self._get_object_with_access_controls(identifier, enums.Operation.GET)
    if managed._object_type != enums.ObjectType.PRIVATE_KEY:
        return _symmetric_decrypt(self, payload)
    parameters = payload.cryptographic_parameters
    if parameters is None:
        raise exceptions.InvalidField("The cryptographic parameters must be specified.")
    if managed.state != enums.State.ACTIVE:
        raise exceptions.PermissionDenied("The decryption key must be in the Active state.")
    if enums.CryptographicUsageMask.DECRYPT not in managed.cryptographic_usage_masks:
        raise exceptions.PermissionDenied("The Decrypt bit must be set in the key's usage mask.")
    try:
        plain = self._cryptography_engine.decrypt(
            parameters.cryptographic_algorithm,
            managed.value,
            payload.data,
            padding_method=parameters.padding_method,
            hashing_algorithm=parameters.hashing_algorithm,
        )
    except ValueError:
        raise exceptions.CryptographicFailure("Decryption failed.") from None
    return payloads.DecryptResponsePayload(identifier, plain)


kmip_engine.KmipEngine._process_decrypt = _process_decrypt
# The handler table is built per engine from the bound methods; the version decorator is kept.


def main() -> None:
    folder, port = sys.argv[1], int(sys.argv[2])
    server = kmip_server.KmipServer(
        hostname="127.0.0.1",
        port=port,
        certificate_path=f"{folder}/server.crt",
        key_path=f"{folder}/server.key",
        ca_path=f"{folder}/ca.crt",
        auth_suite="TLS1.2",
        config_path=None,
        log_path=f"{folder}/server.log",
        policy_path=None,
        enable_tls_client_auth=True,
        logging_level="INFO",
        database_path=f"{folder}/objects.db",
    )
    with server:
        server.serve()


if __name__ == "__main__":
    main()
