"""Several processes racing on one database: each imports and connects first, then all are released
at once through a go-file, so the interesting part (the writes) really overlaps."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

WORKER = r"""
import asyncio, json, os, sys, time, uuid
from datetime import datetime
from keyconnector.runtime.settings import DatabaseSettings
from keyconnector.storage.registry import migrate, open_repository

spec = json.loads(sys.argv[1])
settings = DatabaseSettings(**spec["settings"])
open(spec["ready"], "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(spec["go"]):
    if time.monotonic() > deadline:
        sys.exit("never told to go")
    time.sleep(0.0005)

async def main():
    out = {}
    now = datetime(2026, 1, 1)
    if spec["op"] == "bootstrap":
        migrate(settings)
        repository = await open_repository(settings)
        out["stored"] = await repository.store_wrapped_data_key(spec["wrapped"])
        out["read"] = await repository.get_wrapped_data_key()
    else:
        repository = await open_repository(settings)
        user = uuid.UUID(spec["user"]) if "user" in spec else None
        if spec["op"] == "call":
            # Any repository method whose arguments and result are plain JSON values.
            out["result"] = await getattr(repository, spec["method"])(*spec.get("args", []))
        elif spec["op"] == "post_same":
            out["created"] = await repository.create_key(user, spec["record"], now)
        elif spec["op"] == "put_same":
            for i in range(10):
                await repository.put_key(user, spec["record"] + f"-{i}", now)
            out["last"] = spec["record"] + "-9"
        elif spec["op"] == "many":
            tasks = []
            for i, other in enumerate(spec["users"]):
                other = uuid.UUID(other)
                if i % 2:
                    tasks.append(repository.put_key(other, f"put-{other}", now))
                else:
                    tasks.append(repository.create_key(other, f"create-{other}", now))
            out["results"] = await asyncio.gather(*tasks)
            await repository.record_access({uuid.UUID(u): now for u in spec["users"]})
    await repository.aclose()
    print(json.dumps(out))

asyncio.run(main())
"""


def race(folder: Path, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One process per spec; all import and connect first, then are released at once."""
    gate = folder / "gate"
    gate.mkdir(exist_ok=True)
    go = gate / f"go-{uuid.uuid4().hex}"
    processes = []
    readies = []
    for index, spec in enumerate(specs):
        ready = gate / f"ready-{go.name}-{index}"
        readies.append(ready)
        payload = json.dumps({**spec, "ready": str(ready), "go": str(go)})
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, payload],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + 60
    while not all(ready.exists() for ready in readies):
        assert time.monotonic() < deadline, "workers did not start"
        assert all(p.poll() is None for p in processes), [
            p.communicate() for p in processes if p.poll() is not None
        ]
        time.sleep(0.01)
    go.touch()
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=90)
        assert process.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results
