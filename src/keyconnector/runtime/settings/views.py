"""Checked views of the settings: what the rest of the code reads, with the message it needs when
a setting is missing."""

from __future__ import annotations

from keyconnector.errors import ConfigurationError
from keyconnector.runtime.settings.model import Settings


def identity_server_uri(settings: Settings) -> str:
    """The one setting without which nothing can be authorised: required, with a message that says why."""
    if not settings.identity_server_uri:
        raise ConfigurationError(
            "identityServerUri", "is not set; it is the URL of the Bitwarden identity server"
        )
    return settings.identity_server_uri
