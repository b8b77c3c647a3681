"""schemathesis against a real `keyconnector serve`: every answer is one the OpenAPI description documents.

Requests are generated from ``keyconnector.http.openapi`` (valid and invalid bodies, headers, methods)
and sent over HTTP to a real service on SQLite; most carry a valid token from the test issuer (for
one of a few users, so that creates, replaces and "already has a key" all happen), the rest whatever
schemathesis makes of the bearer scheme. Every response must have a documented status, content type
and shape, and none may be a 500. ``make test`` runs a few hundred cases; ``make fuzz`` sets
``KC_FUZZ_EXAMPLES`` for a long run.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from keyconnector.devtools.issuer import DevIssuer
from keyconnector.http.endpoints import openapi_document
from tests.conftest import Pfx, Service, base_env

EXAMPLES = int(os.environ.get("KC_FUZZ_EXAMPLES", "60"))
"""Per operation: 60 x 7 operations is a few hundred cases in ``make test``."""

schema = schemathesis.openapi.from_dict(openapi_document())
USERS = [uuid.uuid4() for _ in range(3)]
_turn = itertools.count()


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory: pytest.TempPathFactory, issuer: DevIssuer, pfx: Pfx) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("fuzz")
    env = base_env(issuer, pfx, folder / "kc.db")
    # Throttling answers are documented (429), but they would hide every other path after a few cases.
    for name in ("perUserPerMinute", "perAddressPerMinute", "failedAuthPerAddressPerMinute"):
        env[f"keyConnectorSettings__rateLimit__{name}"] = "0"
    service = Service(env, folder / "service.log")
    service.start()
    yield service
    service.stop()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_is_documented(
    case: schemathesis.Case[Any], fuzz_service: Service, issuer: DevIssuer
) -> None:
    turn = next(_turn)
    headers = {}
    # A POST of valid data must succeed (positive data acceptance), so it gets a user with no key yet;
    # GET and PUT share a few users, so that reads find keys and writes replace them.
    user = uuid.uuid4() if case.method == "POST" else USERS[turn % len(USERS)]
    if turn % 5 != 4:  # one case in five keeps what schemathesis generated for the bearer scheme
        headers["Authorization"] = f"Bearer {issuer.mint(user)}"
    case.call_and_validate(base_url=fuzz_service.url, headers=headers, timeout=30)


def test_the_service_logged_no_unhandled_error(fuzz_service: Service) -> None:
    """Runs after the fuzzing above (same module service): nothing reached the last-resort handler."""
    assert "unhandled error" not in fuzz_service.logs()
    assert Path(fuzz_service.log_path).exists()
