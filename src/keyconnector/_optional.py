"""Lazy imports of optional dependencies, so that a missing extra is a readable configuration error."""

from __future__ import annotations

import importlib
from types import ModuleType

from keyconnector.errors import MissingDependencyError


def require(module: str, *, extra: str, setting: str, provider: str) -> ModuleType:
    """Import ``module`` or explain which ``keyconnector[extra]`` to install for ``provider``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(setting, provider, extra, module.split(".")[0]) from None
