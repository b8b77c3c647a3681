"""Warnings about a deployment that works but not as its operator probably means it to.

Nothing here stops anything: each function returns one sentence (or None), which ``serve`` logs
once at WARNING in its parent's pre-flight (never once per worker) and ``keyconnector check`` prints
as a ``warn`` line, so that both say the same thing in the same words. Each sentence names the
setting that changes the outcome, by the name the operator writes. (One is not a warning:
:func:`development_identity_notice`, ``make run``'s greeting, is logged at INFO.)
"""

from __future__ import annotations

from urllib.parse import urlsplit

from keyconnector.core.envelope import LEGACY_VERSION, DataKeys, is_legacy
from keyconnector.errors import setting_name
from keyconnector.runtime.settings.views import DEVELOPMENT_IDENTITY_URI
from keyconnector.storage.base import RecordStore, UserKeyRecord

SAMPLE_SIZE = 1000
"""Records looked at for upstream's format at each start: the first page in primary-key order, one
indexed query whatever the size of the table (``stats`` counts them all). User ids are random
GUIDs, so the first page is a fair sample: a deployment half upgraded shows up in it."""

WRITE_LEGACY = setting_name("compat.writeLegacyFormat")
WEB_VAULT = setting_name("webVaultUri")
IDENTITY = setting_name("identityServerUri")


def _notice(text: str) -> str:
    """Marks a notice's text for the troubleshooting page's extractor (tests/support/messages.py)."""
    return text


def cors_notice(web_vault_uri: str | None) -> str | None:
    """Why browsers cannot use the service, when ``webVaultUri`` is missing or not an origin.

    Upstream's CORS allows exactly that origin; without it every browser request is refused by the
    browser itself, which the service never sees: the web vault cannot unlock and the admin
    console's Key Connector "Test" button fails, with nothing in the service's log."""
    if not web_vault_uri or not web_vault_uri.strip():
        return _notice(
            f"{WEB_VAULT} is not set, so CORS allows no origin: the web vault and the admin console's Key "
            "Connector Test button cannot reach this service (browsers refuse the answers; other clients are "
            "not affected). Set it to the web vault's URL, such as https://vault.example.com"
        )
    parts = urlsplit(web_vault_uri.strip())
    if (
        parts.scheme not in {"http", "https"}
        or not parts.netloc
        or parts.path not in {"", "/"}
        or parts.query
        or parts.fragment
    ):
        return _notice(
            f"{WEB_VAULT} is not an origin (scheme://host[:port], no path, query or fragment), so no browser "
            "request matches it and CORS allows no origin: the web vault and the admin console's Key "
            "Connector Test button cannot reach this service. Set it to the web vault's URL, such as "
            "https://vault.example.com"
        )
    return None


def is_development_identity(identity_server_uri: str | None) -> bool:
    """Whether ``identityServerUri`` is the development address ``make run`` writes."""
    if not identity_server_uri:
        return False
    return identity_server_uri.strip().rstrip("/").lower() == DEVELOPMENT_IDENTITY_URI


def development_identity_notice(identity_server_uri: str | None) -> str | None:
    """What a newcomer who ran ``make run`` needs to hear once, at start, instead of a WARNING that
    the identity server cannot be reached: where the service points, and the two ways on.

    Logged at INFO by ``serve``'s pre-flight; the worker's "cannot be fetched" line for this address
    is INFO too (``http.app``), so a fresh ``make run`` greets with an explanation, not an alarm."""
    if not is_development_identity(identity_server_uri):
        return None
    return _notice(
        f"{IDENTITY} is {DEVELOPMENT_IDENTITY_URI}, the development identity URL `make run` uses, "
        "and nothing issues tokens there: the service runs (/alive, /health) but no Bitwarden client "
        "can log in. To see the whole flow, stop this and run `make demo` (or `keyconnector demo`: a "
        "development identity server, an enrolment and a read-back); to serve real clients, set "
        f"{IDENTITY} to your Bitwarden identity server, like https://vault.example.com/identity"
    )


async def upstream_records_sampled(records: RecordStore, size: int = SAMPLE_SIZE) -> tuple[int, int]:
    """``(upstream-format records, records with a key)`` among the first ``size`` rows: one page."""
    pages = records.iter_records(size)
    try:
        page: list[UserKeyRecord] = await anext(pages, [])
    finally:
        # Every backend's pages are an async generator; the protocol only promises an iterator.
        close = getattr(pages, "aclose", None)
        if close is not None:
            await close()
    keys = [record.key for record in page if record.key is not None]
    return sum(1 for key in keys if is_legacy(key)), len(keys)


async def way_back_notice(records: RecordStore, keys: DataKeys) -> str | None:
    """What an operator who may still move back to upstream must hear: the database holds records in
    upstream's format (it was taken over and may be meant to go back), but new and replaced keys are
    written in a format upstream cannot read.

    None when new records are written in upstream's format (``compat.writeLegacyFormat``), when no
    upstream-format record is in the sample, and when the key ring refuses upstream-format records
    (``upgrade-records`` finished: such a record is a replayed row, reported when it is read)."""
    if keys.seals_legacy or not keys.accept_legacy:
        return None
    upstream, sampled = await upstream_records_sampled(records)
    if not upstream:
        return None
    found = f"{upstream} of the first {sampled} records are in upstream's format"
    if keys.current != LEGACY_VERSION:
        return _notice(
            f"{found}, but data key version {keys.current} seals new and replaced keys, which upstream "
            f"cannot read whatever {WRITE_LEGACY} says: the way back to upstream is `keyconnector "
            "downgrade-records` (docs/takeover.md); `keyconnector upgrade-records` binds the old records "
            "if you will not go back"
        )
    return _notice(
        f"{found}, but new and replaced keys are written bound to their user, which upstream cannot read: "
        f"set {WRITE_LEGACY}=true to keep the way back to upstream open, or run `keyconnector "
        "upgrade-records` once you will not go back (`keyconnector stats` counts the records per format)"
    )
