"""Bad input is a 4xx with a JSON message, never a 5xx, and the service keeps serving."""

from __future__ import annotations

import base64
import json
import secrets
import uuid

import pytest

from keyconnector.devtools.issuer import DevIssuer
from tests.conftest import Service

GOOD = base64.b64encode(secrets.token_bytes(32)).decode()
JSON_TYPE = "application/json"

CASES = [
    ("invalid JSON", b'{"key": ', JSON_TYPE, 400),
    ("empty body", b"", JSON_TYPE, 400),
    ("a JSON array", b'["key"]', JSON_TYPE, 400),
    ("a JSON string", b'"key"', JSON_TYPE, 400),
    ("a JSON number", b"42", JSON_TYPE, 400),
    ("null body", b"null", JSON_TYPE, 400),
    ("no key property", b'{"value": "AAAA"}', JSON_TYPE, 400),
    ("key null", b'{"key": null}', JSON_TYPE, 400),
    ("key empty", b'{"key": ""}', JSON_TYPE, 400),
    ("key a number", b'{"key": 12345}', JSON_TYPE, 400),
    ("key an object", b'{"key": {"a": 1}}', JSON_TYPE, 400),
    ("key a list", b'{"key": ["AAAA"]}', JSON_TYPE, 400),
    ("key not base64", b'{"key": "not base64!"}', JSON_TYPE, 400),
    ("key base64 without padding", b'{"key": "AAAAAA"}', JSON_TYPE, 400),
    ("key url-safe alphabet", b'{"key": "-_-_"}', JSON_TYPE, 400),
    (
        "key over 1 KiB decoded",
        json.dumps({"key": base64.b64encode(b"x" * 1025).decode()}).encode(),
        JSON_TYPE,
        400,
    ),
    ("two key properties", json.dumps({"key": GOOD, "Key": GOOD}).encode(), JSON_TYPE, 400),
    ("body over 64 KiB", json.dumps({"key": GOOD, "pad": "x" * 70000}).encode(), JSON_TYPE, 413),
    ("text/plain", json.dumps({"key": GOOD}).encode(), "text/plain", 415),
    ("form encoded", b"key=AAAA", "application/x-www-form-urlencoded", 415),
    ("no content type", json.dumps({"key": GOOD}).encode(), None, 415),
    ("deeply nested JSON", b'{"key": ' + b"[" * 30000 + b"]" * 30000 + b"}", JSON_TYPE, 400),
    ("not UTF-8", b'{"key": "\xff\xfe"}', JSON_TYPE, 400),
]


@pytest.mark.parametrize("method", ["POST", "PUT"])
@pytest.mark.parametrize(("label", "body", "content_type", "status"), CASES, ids=[c[0] for c in CASES])
def test_bad_bodies_are_refused_with_a_reason(
    shared_service: Service,
    issuer: DevIssuer,
    method: str,
    label: str,
    body: bytes,
    content_type: str | None,
    status: int,
) -> None:
    user = uuid.uuid4()
    headers = {"Authorization": f"Bearer {issuer.mint(user)}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    with shared_service.client() as client:
        response = client.request(method, "/user-keys", headers=headers, content=body)
        assert response.status_code == status, response.text
        assert response.json()["message"]
        # Nothing was stored, and the service still serves.
        assert client.get("/user-keys", headers=headers).status_code == 404
        assert client.get("/health").text == "Healthy"


def test_a_chunked_body_over_the_limit_is_cut_off(shared_service: Service, issuer: DevIssuer) -> None:
    headers = {"Authorization": f"Bearer {issuer.mint(uuid.uuid4())}", "Content-Type": JSON_TYPE}

    def chunks() -> object:
        yield b'{"key": "'
        for _ in range(100):
            yield b"A" * 1024
        yield b'"}'

    with shared_service.client() as client:
        response = client.post("/user-keys", headers=headers, content=chunks())  # type: ignore[arg-type]
    assert response.status_code == 413


def test_keys_of_other_sizes_than_32_bytes_are_accepted_like_upstream(
    shared_service: Service, issuer: DevIssuer
) -> None:
    headers = {"Authorization": f"Bearer {issuer.mint(uuid.uuid4())}"}
    key = base64.b64encode(secrets.token_bytes(64)).decode()
    with shared_service.client() as client:
        assert client.post("/user-keys", headers=headers, json={"key": key}).status_code == 200
        assert client.get("/user-keys", headers=headers).json() == {"key": key}
