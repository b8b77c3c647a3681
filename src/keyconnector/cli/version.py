"""``keyconnector --version``: what an operator pastes into a ticket."""

from __future__ import annotations

import json
import os
import platform
import ssl
import subprocess
from importlib import metadata
from pathlib import Path

from keyconnector import __version__

COMMIT_ENV = "KEYCONNECTOR_COMMIT"
"""Set by the container image's build (``--build-arg COMMIT=...``), where no git checkout exists."""


def commit() -> str:
    """The commit this copy was built from: the image's build argument, the checkout it runs from
    (an editable install), or what pip recorded for ``pip install git+...``; else ``unknown``."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV][:12]
    head = _git("rev-parse", "--short=12", "HEAD")
    if head:
        return head + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    try:
        direct = metadata.distribution("keyconnector").read_text("direct_url.json")
        if direct:
            vcs = json.loads(direct).get("vcs_info", {})
            if vcs.get("commit_id"):
                return str(vcs["commit_id"])[:12]
    except (metadata.PackageNotFoundError, ValueError):
        pass
    return "unknown"


def _git(*args: str) -> str:
    """What ``git`` prints about the checkout this module runs from; empty when it is not one (or
    git is missing)."""
    here = Path(__file__).resolve().parent
    try:
        done = subprocess.run(
            ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def openssl_versions() -> str:
    """cryptography's OpenSSL (which wraps the keys) and Python's (which the clients' TLS uses)."""
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        wraps = backend.openssl_version_text()
    except Exception:  # pragma: no cover - cryptography is a hard dependency
        wraps = "unknown"
    return f"{wraps} (cryptography), {ssl.OPENSSL_VERSION} (Python ssl)"


def version_text() -> str:
    return (
        f"keyconnector {__version__}\n"
        f"commit {commit()}\n"
        f"Python {platform.python_version()} ({platform.python_implementation()})\n"
        f"{openssl_versions()}"
    )
