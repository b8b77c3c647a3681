#!/usr/bin/env bash
# Container entrypoint for keyconnector.
#
# Three jobs, in this order:
#
# 1. Step down from root, as upstream's image does for Bitwarden's installer. bitwarden.sh passes
#    env/uid.env (LOCAL_UID, LOCAL_GID: the host user that owns ./bwdata) to every container, and
#    upstream's image starts as root, gives /etc/bitwarden to those ids and runs the service as them
#    (65534, nobody, when they are 0 or unset). Swapping only the image must keep working, so this
#    image starts as root too, and root does nothing else: re-own the data folder, then re-run this
#    script as the service user with setpriv (util-linux, in every Debian image): no supplementary
#    groups, no capabilities, no_new_privs. Root is never the service's user: 0 means 65534, and a
#    container that starts as root but may not change its ids (cap_drop: ALL) is refused rather than
#    served as root. A container started as a user (docker --user, Kubernetes runAsUser) skips this.
# 2. As that user: make the mounted CAs trusted. The service trusts caCertificatesDirectory for its
#    own outgoing TLS, but libraries and tools that only read SSL_CERT_FILE / REQUESTS_CA_BUNDLE (and a
#    shell someone opens in the container) do not know that folder. Upstream copies the certificates
#    into the system store as root; here the combined bundle (system bundle + mounted certificates) is
#    written to a writable place by the service user instead and exported, which also works with a
#    read-only root filesystem. Logs go where upstream's did: when the logs folder is mounted
#    (bitwarden.sh mounts ../logs/key-connector there) and no log file is configured, the service
#    writes keyconnector.log in it as well as to standard error.
# 3. exec the command, so that the server is the process that receives SIGTERM (tini, PID 1, forwards
#    it) and drains, with nothing left behind when it exits.
#
# Arguments:
#   (none)                     -> keyconnector serve
#   -x / --flag ...            -> keyconnector serve --flag ...
#   serve|check|init ARGS      -> keyconnector serve|check|init ARGS
#   a command on PATH ARGS     -> run as is (e.g. `bash` for debugging)
#   any other word ARGS        -> keyconnector WORD ARGS (backup, rotate-key-pair, ...)
#
# Environment (all optional; the defaults are the container's paths, the others are for other
# layouts and for the tests):
#   LOCAL_UID, LOCAL_GID            the ids to run as when the container starts as root (bitwarden.sh's
#                                   env/uid.env). Default, and instead of 0: 65534.
#   KEYCONNECTOR_BITWARDEN_DIR      the folder given to that user. Default: /etc/bitwarden.
#   KEYCONNECTOR_CA_DIR             folder of extra CA certificates (*.crt, *.pem; PEM or DER).
#                                   Default: $keyConnectorSettings__caCertificatesDirectory if set,
#                                   else $KEYCONNECTOR_BITWARDEN_DIR/ca-certificates.
#   KEYCONNECTOR_CA_BUNDLE          where to write the combined bundle.
#                                   Default: ${TMPDIR:-/tmp}/keyconnector-ca-bundle.pem
#   KEYCONNECTOR_SYSTEM_CA_BUNDLE   the system bundle to start from.
#                                   Default: /etc/ssl/certs/ca-certificates.crt
#   KEYCONNECTOR_LOGS_DIR           where upstream's logs went. Default: $KEYCONNECTOR_BITWARDEN_DIR/logs
#   KEYCONNECTOR_PYTHON             the interpreter that checks the certificates (needs cryptography).
#                                   Default: python3 from PATH (the image's virtualenv).
#   KEYCONNECTOR_BIN                the keyconnector command. Default: keyconnector from PATH.
set -euo pipefail

say() {
    printf 'entrypoint: %s\n' "$*" >&2
}

bitwarden_dir="${KEYCONNECTOR_BITWARDEN_DIR:-/etc/bitwarden}"
ca_dir="${KEYCONNECTOR_CA_DIR:-${keyConnectorSettings__caCertificatesDirectory:-$bitwarden_dir/ca-certificates}}"
bundle="${KEYCONNECTOR_CA_BUNDLE:-${TMPDIR:-/tmp}/keyconnector-ca-bundle.pem}"
system_bundle="${KEYCONNECTOR_SYSTEM_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
logs_dir="${KEYCONNECTOR_LOGS_DIR:-$bitwarden_dir/logs}"
python="${KEYCONNECTOR_PYTHON:-python3}"
keyconnector="${KEYCONNECTOR_BIN:-keyconnector}"

# The id that LOCAL_UID or LOCAL_GID stands for, on stdout: 65534 when unset, empty or 0 (as upstream:
# a host user that is root must not make the service root). Fails, printing nothing, on anything but a
# whole number below 2^32 - 1 (that one means "no change" to the kernel).
service_id() {
    local value="${1:-0}"
    if [[ ! "$value" =~ ^[0-9]{1,10}$ ]] || ((10#$value > 4294967294)); then
        return 1
    fi
    value=$((10#$value))
    if [ "$value" -eq 0 ]; then
        value=65534
    fi
    printf '%s\n' "$value"
}

# Whether this process holds capability number $1 in its effective set (linux/capability.h).
has_capability() {
    local key value mask=""
    while read -r key value; do
        if [ "$key" = "CapEff:" ]; then
            mask="$value"
        fi
    done </proc/self/status
    [ -n "$mask" ] && (((16#$mask >> $1) & 1))
}

# Gives everything under the data folder to the service user, as upstream does at every start (the
# installer's files belong to the host user, and LOCAL_UID may have changed since). Only what is not
# theirs yet is touched, and links are never followed (find -P, chown -h): a link the service user
# planted cannot make root hand it a file outside the folder. A file that cannot be re-owned (a
# read-only mount) is reported, not fatal: the service says what it then cannot read or write.
take_ownership() {
    local uid="$1" gid="$2" errors
    [ -d "$bitwarden_dir" ] || return 0
    if ! errors="$(find "$bitwarden_dir" \( ! -uid "$uid" -o ! -gid "$gid" \) \
        -exec chown -h -- "$uid:$gid" {} + 2>&1)"; then
        say "could not give every file under $bitwarden_dir to $uid:$gid (a read-only mount?): ${errors%%$'\n'*}"
    fi
}

if [ "$(id -u)" = 0 ]; then
    if ! uid="$(service_id "${LOCAL_UID:-}")"; then
        say "LOCAL_UID=${LOCAL_UID} is not a user id (a whole number, 0 for the default 65534); fix it in env/uid.env or the container's environment"
        exit 64
    fi
    if ! gid="$(service_id "${LOCAL_GID:-}")"; then
        say "LOCAL_GID=${LOCAL_GID} is not a group id (a whole number, 0 for the default 65534); fix it in env/uid.env or the container's environment"
        exit 64
    fi
    # CAP_SETGID is 6, CAP_SETUID 7.
    if ! has_capability 6 || ! has_capability 7; then
        say "the container starts as root but may not change its user (no SETUID/SETGID capability), and the service never runs as root: run the container as a user (docker run --user $uid:$gid, compose user: \"$uid:$gid\") or give it back those capabilities (cap_add: [SETUID, SETGID, CHOWN])"
        exit 1
    fi
    if ! command -v setpriv >/dev/null 2>&1; then
        say "setpriv (util-linux) is not installed, so the service cannot step down from root to $uid:$gid"
        exit 1
    fi
    take_ownership "$uid" "$gid"
    say "running as uid $uid, gid $gid (LOCAL_UID/LOCAL_GID; $bitwarden_dir belongs to them)"
    exec setpriv --reuid="$uid" --regid="$gid" --clear-groups --inh-caps=-all --no-new-privs -- \
        "$BASH" "$0" "$@"
fi

# Files the service creates (a new data.json, a log file, a backup) are not for everyone to read.
umask 0027

if [ -n "${LOCAL_UID:-}${LOCAL_GID:-}" ]; then
    wanted_uid="$(service_id "${LOCAL_UID:-}" || printf '%s' "${LOCAL_UID:-}")"
    wanted_gid="$(service_id "${LOCAL_GID:-}" || printf '%s' "${LOCAL_GID:-}")"
    if [ "$wanted_uid:$wanted_gid" != "$(id -u):$(id -g)" ]; then
        say "LOCAL_UID/LOCAL_GID ($wanted_uid:$wanted_gid) not applied: the container runs as $(id -u):$(id -g), and only a container that starts as root steps down to them"
    fi
fi

# The service's log file, unless the operator chose one (any spelling of the name, as the settings
# loader matches names without regard to case; an empty value means no file).
log_file_is_set() {
    local name lowered
    while IFS= read -r name; do
        lowered="${name,,}"
        if [ "$lowered" = "keyconnectorsettings__logging__file" ] \
            || [ "$lowered" = "keyconnectorsettings:logging:file" ]; then
            return 0
        fi
    done < <(compgen -e)
    return 1
}

if [ -d "$logs_dir" ] && ! log_file_is_set; then
    if [ -w "$logs_dir" ] && [ -x "$logs_dir" ]; then
        export keyConnectorSettings__logging__file="$logs_dir/keyconnector.log"
        say "logging to $keyConnectorSettings__logging__file as well (set keyConnectorSettings__logging__file to change it)"
    else
        say "$logs_dir is not writable by uid $(id -u): logging to standard error only"
    fi
fi

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
