#!/usr/bin/env bash
# Container entrypoint for keyconnector.
#
# Why this script exists at all: the service trusts the company CAs in caCertificatesDirectory for its
# own outgoing TLS, but libraries and tools that only read SSL_CERT_FILE / REQUESTS_CA_BUNDLE (and a
# shell someone opens in the container) do not know that folder. Upstream's image runs
# update-ca-certificates as root; this image never runs as root, so the combined bundle (system
# bundle + mounted certificates) is written to a writable place instead and exported.
#
# Then it exec's the command, so that the server is the process that receives SIGTERM (tini, PID 1,
# forwards it) and drains, with nothing left behind when it exits.
#
# Arguments:
#   (none)                     -> keyconnector serve
#   -x / --flag ...            -> keyconnector serve --flag ...
#   serve|check|init ARGS      -> keyconnector serve|check|init ARGS
#   a command on PATH ARGS     -> run as is (e.g. `bash` for debugging)
#   any other word ARGS        -> keyconnector WORD ARGS (backup, rotate-key-pair, ...)
#
# Environment (all optional; defaults are the container's paths):
#   KEYCONNECTOR_CA_DIR             folder of extra CA certificates (*.crt, *.pem; PEM or DER).
#                                   Default: $keyConnectorSettings__caCertificatesDirectory if set,
#                                   else /etc/bitwarden/ca-certificates.
#   KEYCONNECTOR_CA_BUNDLE          where to write the combined bundle.
#                                   Default: ${TMPDIR:-/tmp}/keyconnector-ca-bundle.pem
#   KEYCONNECTOR_SYSTEM_CA_BUNDLE   the system bundle to start from.
#                                   Default: /etc/ssl/certs/ca-certificates.crt
#   KEYCONNECTOR_PYTHON             the interpreter that checks the certificates (needs cryptography).
#                                   Default: python3 from PATH (the image's virtualenv).
#   KEYCONNECTOR_BIN                the keyconnector command. Default: keyconnector from PATH.
set -euo pipefail

say() {
    printf 'entrypoint: %s\n' "$*" >&2
}

ca_dir="${KEYCONNECTOR_CA_DIR:-${keyConnectorSettings__caCertificatesDirectory:-/etc/bitwarden/ca-certificates}}"
bundle="${KEYCONNECTOR_CA_BUNDLE:-${TMPDIR:-/tmp}/keyconnector-ca-bundle.pem}"
system_bundle="${KEYCONNECTOR_SYSTEM_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
python="${KEYCONNECTOR_PYTHON:-python3}"
keyconnector="${KEYCONNECTOR_BIN:-keyconnector}"

# Builds the bundle in Python rather than with openssl(1): it is always in the image (the service
# needs it), it reads PEM and DER alike, and it tells a junk file apart from a certificate reliably.
# Prints the bundle's path on stdout when it wrote one; every message goes to stderr.
build_bundle() {
    "$python" - "$ca_dir" "$system_bundle" "$bundle" <<'PY'
import os
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

ca_dir, system_bundle, bundle = (Path(arg) for arg in sys.argv[1:4])


def say(message: str) -> None:
    print(f"entrypoint: {message}", file=sys.stderr)


if not ca_dir.is_dir():
    sys.exit(0)  # no folder mounted: nothing to add, keep the defaults
extras: list[bytes] = []
for path in sorted(ca_dir.iterdir()):
    if path.suffix.lower() not in {".crt", ".pem"} or not path.is_file():
        continue
    try:
        data = path.read_bytes()
    except OSError as exc:
        say(f"skipping {path}: cannot read it ({exc.strerror})")
        continue
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        try:
            certificates = [x509.load_der_x509_certificate(data)]
        except ValueError:
            say(f"skipping {path}: not a PEM or DER certificate")
            continue
    for certificate in certificates:
        extras.append(certificate.public_bytes(Encoding.PEM))
    say(f"trusting {len(certificates)} certificate(s) from {path}")
if not extras:
    sys.exit(0)
try:
    base = system_bundle.read_bytes()
except OSError as exc:
    say(f"the system bundle {system_bundle} is unreadable ({exc.strerror}); using the mounted CAs only")
    base = b""
if base and not base.endswith(b"\n"):
    base += b"\n"
try:
    bundle.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed: a restart never sees a half-written bundle.
    fd, temporary = tempfile.mkstemp(dir=bundle.parent, prefix=".ca-bundle-")
    with os.fdopen(fd, "wb") as handle:
        handle.write(base + b"".join(extras))
    os.chmod(temporary, 0o644)
    os.replace(temporary, bundle)
except OSError as exc:
    say(f"cannot write the CA bundle {bundle} ({exc.strerror}); set KEYCONNECTOR_CA_BUNDLE to a writable path")
    sys.exit(0)
print(bundle)
PY
}

if written="$(build_bundle)" && [ -n "$written" ]; then
    export SSL_CERT_FILE="$written"
    export REQUESTS_CA_BUNDLE="$written"
    export CURL_CA_BUNDLE="$written"
    say "SSL_CERT_FILE and REQUESTS_CA_BUNDLE point to $written"
fi

if [ "$#" -eq 0 ]; then
    set -- serve
elif [ "$1" = --version ]; then
    exec "$keyconnector" --version
elif [ "${1#-}" != "$1" ]; then
    set -- serve "$@"
fi

case "$1" in
    serve | check | init)
        exec "$keyconnector" "$@"
        ;;
esac
if command -v -- "$1" >/dev/null 2>&1; then
    exec "$@"
fi
# Any other word is a keyconnector subcommand (backup, rotate-key-pair, ...); keyconnector itself
# reports an unknown one with its usage.
exec "$keyconnector" "$@"
