"""The exception tree drawn in ``keyconnector.errors``' docstring is the real one.

A drawing nobody checks goes stale the day a class is added or moved; this test walks the
subclasses of ``KeyConnectorError`` after importing every module of the package and compares
them, parent and defining module included, with the drawing.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

import keyconnector
from keyconnector import errors
from keyconnector.errors import KeyConnectorError

SKIPPED = (".__main__", ".migrations.")
"""``python -m keyconnector`` runs the command line on import; migration scripts run only under Alembic."""

_LINE = re.compile(r"^    (?P<tree>(?:[|+ ] {3}|\+-- )*)(?P<name>[A-Z]\w+)\s+(?P<module>[a-z][\w.]*): ")


def drawn_tree() -> dict[str, tuple[str | None, str]]:
    """Class name -> (parent name, defining module without ``keyconnector.``), as the docstring draws it."""
    assert errors.__doc__ is not None
    drawn: dict[str, tuple[str | None, str]] = {}
    ancestors: list[str] = []
    for line in errors.__doc__.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        depth = len(match["tree"]) // 4
        del ancestors[depth:]
        name = match["name"]
        assert name not in drawn, f"{name} is drawn twice"
        drawn[name] = (ancestors[-1] if ancestors else None, match["module"])
        ancestors.append(name)
    return drawn


def real_tree() -> dict[str, tuple[str | None, str]]:
    for module in pkgutil.walk_packages(keyconnector.__path__, "keyconnector."):
        if not any(part in module.name + "." for part in SKIPPED):
            importlib.import_module(module.name)
    real: dict[str, tuple[str | None, str]] = {}
    pending: list[tuple[type, str | None]] = [(KeyConnectorError, None)]
    while pending:
        cls, parent = pending.pop()
        if cls.__module__.startswith("keyconnector."):  # not a test's own subclass
            assert cls.__name__ not in real, f"two exception classes are called {cls.__name__}"
            real[cls.__name__] = (parent, cls.__module__.removeprefix("keyconnector."))
        pending.extend((sub, cls.__name__) for sub in cls.__subclasses__())
    return real


def test_the_drawn_exception_tree_is_the_real_one() -> None:
    drawn, real = drawn_tree(), real_tree()
    assert "KeyConnectorError" in drawn and len(drawn) > 10, "the drawing was not found"
    missing = sorted(set(real) - set(drawn))
    gone = sorted(set(drawn) - set(real))
    assert not missing, f"not drawn in keyconnector.errors' docstring: {missing}"
    assert not gone, f"drawn in keyconnector.errors' docstring but not defined: {gone}"
    wrong = {name: (drawn[name], where) for name, where in real.items() if drawn[name] != where}
    assert not wrong, f"drawn as (parent, module), but really: {wrong}"
