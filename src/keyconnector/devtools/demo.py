"""``make demo``: the whole flow in a few seconds, against a throwaway issuer and database.

It starts a development identity issuer (only ever started here and in tests, never by
``serve``), makes a key pair, starts ``keyconnector serve`` as a separate process pointed at the
issuer, and then does what a Bitwarden client does at enrolment and at login.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from keyconnector.devtools import free_port
from keyconnector.devtools.issuer import DevIssuer
from keyconnector.runtime.settings import read_env_file


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(response: httpx.Response) -> None:
    body = response.text if response.content else "(empty body)"
    print(f"   -> {response.status_code} {body}", flush=True)


def run_demo() -> int:
    with tempfile.TemporaryDirectory(prefix="keyconnector-demo-") as tmp, DevIssuer() as issuer:
        folder = Path(tmp)
        step(f"a development identity issuer is up at {issuer.url}")
        step(f"making a key pair and settings in {folder}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "keyconnector",
                "init",
                str(folder),
                "--key-bits",
                "2048",
                "--identity-server-uri",
                issuer.url,
                # A development origin (no browser takes part in the demo): without it init writes a
                # placeholder that serve refuses.
                "--web-vault-uri",
                "https://localhost:8080",
            ],
            check=True,
        )
        port = free_port()
        env = {**os.environ, **read_env_file(folder / "keyconnector.env")}
        step(f"starting `keyconnector serve --port {port}`")
        server = subprocess.Popen(
            [sys.executable, "-m", "keyconnector", "serve", "--port", str(port)],
            env=env,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=10) as client:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        if client.get("/alive").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline or server.poll() is not None:
                        print("the service did not come up", file=sys.stderr)
                        return 1
                    time.sleep(0.2)
                user = uuid.uuid4()
                token = issuer.mint(user)
                auth = {"Authorization": f"Bearer {token}"}
                user_key = base64.b64encode(secrets.token_bytes(32)).decode()

                step("GET /alive (the admin console's test button)")
                show(client.get("/alive"))
                step("GET /user-keys without a token")
                show(client.get("/user-keys"))
                step(f"GET /user-keys for new SSO user {user}: no key yet")
                show(client.get("/user-keys", headers=auth))
                step(f"POST /user-keys: the client enrols its key {user_key}")
                show(client.post("/user-keys", headers=auth, json={"key": user_key}))
                step("GET /user-keys at the next login")
                response = client.get("/user-keys", headers=auth)
                show(response)
                if response.json().get("key") != user_key:
                    print("the key read back differs!", file=sys.stderr)
                    return 1
                step("POST again: refused, the user already has a key")
                show(client.post("/user-keys", headers=auth, json={"key": user_key}))
                new_key = base64.b64encode(secrets.token_bytes(32)).decode()
                step(f"PUT /user-keys: replace it with {new_key}")
                show(client.put("/user-keys", headers=auth, json={"Key": new_key}))
                step("GET /user-keys")
                show(client.get("/user-keys", headers=auth))
                step("GET /health")
                show(client.get("/health"))
                step("the database holds the key encrypted under the data key, never in clear:")
                import sqlite3

                db = sqlite3.connect(folder / "keyconnector.db")
                for row in db.execute('SELECT "Id", "Key", "CreationDate", "RevisionDate" FROM "UserKeys"'):
                    print(f"   {row}")
                db.close()
            step("done")
            return 0
        finally:
            server.terminate()
            server.wait(timeout=15)
