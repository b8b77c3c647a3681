"""Every message keyconnector can show a person, found in the source, and matched against the
troubleshooting page (docs/troubleshooting.md).

Why an extractor rather than a hand-kept list: a list drifts the day someone adds a ``raise``.
Walking the syntax tree of every module finds each construction that ends up in front of an
operator or an API client (exceptions raised on purpose, ``{"message": ...}`` answers, log lines at
WARNING and above, what the commands print) and turns its text into a *pattern*: the literal parts
kept, every computed part a wildcard. The page is then checked against the patterns both ways.

Matching compares *skeletons*: the literal parts with whitespace and quotes normalised and every
placeholder (``{...}`` in the code, ``<...>`` or ``{...}`` on the page) reduced to one wildcard. So a
placeholder may be named anything on the page, but every word around it must be the code's.

Run ``python -m tests.support.messages`` to list the messages the page does not yet document
(and the page's entries that no longer exist), with file and line for each, and
``python -m tests.support.messages --index`` to regenerate the page's index of messages.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "src" / "keyconnector"
PAGE = ROOT / "docs" / "troubleshooting.md"

ENV_PREFIX = "keyConnectorSettings__"
WILD = "\x00"
"""One placeholder in a pattern (a character no message contains)."""

SKIPPED = ("devtools/", "storage/migrations/")
"""Development helpers and migration scripts: never seen by an operator of a deployment."""

MIN_LITERAL = 4
"""A message with fewer letters than this outside its placeholders (``f"{where}: {detail}"``) only
glues other messages together; its parts are documented where they are made."""


@dataclass(frozen=True)
class Spec:
    """Where the text is in a call, and how the printed line wraps it."""

    message: int | str
    """Positional index or keyword of the message text."""
    subject: int | None = None
    """Index of the setting/option/component named in front of the message, if any."""
    form: str = "plain"
    """``setting``: ``keyConnectorSettings__<setting>: <text>``; ``option``: ``<option>: <text>``;
    ``component``: ``<component> is unavailable: <text>``; ``records``: OperationFailed's
    ``<what>: <n> record(s) failed: <users>``; ``damaged``: ``<backup> is damaged: <text>``;
    ``plain``: the text alone."""
    bare_name_only: bool = False
    """Match only ``name(...)``, not ``obj.name(...)`` (``message`` is a common method name)."""


CALLS: dict[str, Spec] = {
    # keyconnector.errors and the exceptions built on it
    "ConfigurationError": Spec(1, 0, "setting"),
    "_config_error": Spec(1, 0, "setting"),
    "UsageError": Spec(1, 0, "option"),
    "UnavailableError": Spec(1, 0, "component"),
    "_gone": Spec(1),
    "KeyConnectorError": Spec(0),
    "StorageError": Spec(0),
    "IntegrityFailure": Spec(0),
    "RecordIntegrityFailure": Spec(0),
    "UnknownVersionError": Spec(0),
    "KeyRingConflict": Spec(0),
    "RotationRefused": Spec(0),
    "RingRefused": Spec(0),
    "NotAdopted": Spec(0),
    "NewDataKeyRefused": Spec(0),
    "ForeignDataKey": Spec(0),
    "LegacyRefusedError": Spec(0),
    "BackupError": Spec(0),
    "SideError": Spec(0),
    "OperationFailed": Spec(0, form="records"),
    "_damaged": Spec(0, form="damaged"),
    "ValueError": Spec(0),
    "ArgumentTypeError": Spec(0),
    "_FetchError": Spec(0),
    "NoWritableServer": Spec(0),
    # HTTP answers
    "AuthError": Spec(1),
    "_unauthorized": Spec(0),
    "_forbidden": Spec(0),
    "BadRequest": Spec(1),
    "message": Spec(1, bare_name_only=True),
    "unavailable": Spec(0, bare_name_only=True),
    "unauthorized": Spec(0, bare_name_only=True),
    # keyconnector check
    "Refusal": Spec(0),
    # keyconnector check
    "CheckResult": Spec(2),
    # warnings logged by serve's pre-flight and printed by check (runtime/notices.py)
    "_notice": Spec(0),
    "KeyPairMissing": Spec(1, 0, "setting"),
}
"""Constructions whose text reaches a person. A new exception class must be added here (the
test checks that every exception class defined under src/ is known)."""

IGNORED_CLASSES = {
    "KeyConnectorError",  # base class, no text of its own
    "_UnknownKey",  # internal signal, turned into an AuthError with its own text
    "_Refused",  # internal: a KMIP failure result, always turned into one of the named errors
    "MissingDependencyError",  # builds its whole text itself (found in its __init__)
    "IncompleteModelError",  # a developer's mistake in the settings model, caught by tests/test_reference
    "BodyTimeout",  # internal signal of layers.hold, answered by the endpoint with its own 408 text
}
"""Exception classes defined under src/ that carry no text of their own."""

SIDE_PREFIXES = {
    "database_prefix": "database",
    "rsa_key_prefix": "rsaKey",
    "certificate_prefix": "certificate",
}
"""``SideSettings`` properties (keyconnector.runtime.settings.views): a section's settings path on
either side of the settings, so a message built from one is listed with both spellings."""

TRANSFER_PREFIX = "transferTo."

LOG_METHODS = {"warning", "error", "exception", "critical"}
LOGGERS = {"log", "logger", "_log", "LOG", "logging"}


@dataclass(frozen=True)
class Message:
    """One message in the code."""

    parts: tuple[str, ...]
    """Literal text, with ``WILD`` for each computed part."""
    file: str
    line: int
    kind: str
    """``raise``, ``http``, ``log``, ``print`` or ``check``."""
    display: str = field(compare=False)
    """The pattern as the page should show it (placeholders named after the code's expressions)."""

    @property
    def skeleton(self) -> str:
        return skeleton_of_parts(self.parts)

    def where(self) -> str:
        return f"{self.file}:{self.line}"


# --------------------------------------------------------------------------------------------------
# Normalisation and matching


_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "`": "'", '"': "'"})


def normalise(text: str) -> str:
    """Whitespace collapsed, every kind of quote made one: what a reader copies is not exact."""
    return re.sub(r"\s+", " ", text.translate(_QUOTES)).strip()


_PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*?>|\{[^{}]*\}")


def skeleton_of_parts(parts: Sequence[str]) -> str:
    """The literal parts joined with one ``WILD`` for each run of placeholders."""
    # Literal text that looks like a placeholder (``<unparseable URL>``) is one on the page too.
    text = normalise(_PLACEHOLDER.sub(WILD, "".join(parts)))
    # Placeholders separated only by punctuation (``<name> (<text>)``) or followed by closing
    # punctuation or an ellipsis are one placeholder: such fragments vary between code paths and
    # carry no words anyone searches for.
    previous = None
    while previous != text:
        previous = text
        text = re.sub(WILD + r"[^\sA-Za-z0-9\x00]*\s?[^\sA-Za-z0-9\x00]*" + WILD, WILD, text)
        text = re.sub(WILD + r"[).]+", WILD, text)
    return text


def skeleton_of_entry(entry: str) -> str:
    """A page entry's skeleton: ``<name>`` and ``{...}`` are placeholders."""
    return skeleton_of_parts([entry])


def literal_letters(parts: Sequence[str]) -> int:
    """Letters of the message's own words: the wrappers every setting or outage message gets
    (``keyConnectorSettings__<setting>: ``, ``<component> is unavailable: ``) do not count."""
    text = "".join(parts).replace(ENV_PREFIX, "").replace(" is unavailable: ", "").replace(WILD, "")
    return sum(ch.isalpha() for ch in text)


def entry_regex(entry: str) -> re.Pattern[str]:
    """A regular expression finding a page entry in real output (placeholders match anything)."""
    skeleton = skeleton_of_entry(entry)
    pieces = [re.escape(piece) for piece in skeleton.split(WILD)]
    return re.compile(".*?".join(pieces), re.DOTALL)


# --------------------------------------------------------------------------------------------------
# Reading the page


_ENTRY = re.compile(r"^- (`+) ?(.+?) ?\1\s*$")


def page_entries(text: str) -> list[tuple[int, str]]:
    """Every documented message: a list item that is only a code span (`` - `text` ``)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        match = _ENTRY.match(line)
        if match:
            found.append((number, match.group(2)))
    return found


# --------------------------------------------------------------------------------------------------
# The index of messages at the end of the page


INDEX_HEADING = "## Index of messages"
INDEX_INTRO = (
    "Every message on this page, alphabetically, each linking to the section that explains it. "
    "Generated: after adding an entry to a section, run `python -m tests.support.messages --index`."
)


def slug(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading: lower case, punctuation other
    than ``-`` and ``_`` dropped, spaces made hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def entry_sections(text: str) -> list[tuple[str, str]]:
    """Every entry above the index, with the anchor of the heading it is listed under."""
    found: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    anchor = ""
    for line in text.splitlines():
        if line.startswith(INDEX_HEADING):
            break
        heading = re.match(r"^#{1,6} (.+?)\s*$", line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            anchor = base if count == 0 else f"{base}-{count}"
            continue
        match = _ENTRY.match(line)
        if match:
            found.append((match.group(2), anchor))
    return found


def _code_span(text: str) -> str:
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def with_index(text: str) -> str:
    """The page with its index of messages (re)generated: one line per entry, alphabetically."""
    body = text.split("\n" + INDEX_HEADING, 1)[0].rstrip("\n")
    rows = sorted(set(entry_sections(body)), key=lambda row: (normalise(row[0]).casefold(), row[0], row[1]))
    index = [f"- [{_code_span(entry)}](#{anchor})" for entry, anchor in rows]
    return "\n".join([body, "", INDEX_HEADING, "", INDEX_INTRO, "", *index]) + "\n"


def find_on_page(output: str, entries: Sequence[str]) -> list[str]:
    """The page entries whose pattern occurs in ``output`` (a line the service really printed)."""
    seen = normalise(output)
    return [
        entry
        for entry in entries
        if len(skeleton_of_entry(entry).replace(WILD, "")) >= 8 and entry_regex(entry).search(seen)
    ]


# --------------------------------------------------------------------------------------------------
# Reading the code


def _callee(node: ast.Call) -> tuple[str, bool] | None:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id, True
    if isinstance(func, ast.Attribute):
        return func.attr, False
    return None


class _Module:
    """One source file: its string constants, and its functions for local look-ups."""

    def __init__(self, path: Path, root: Path = SOURCE) -> None:
        self.path = path
        self.root = root
        self.rel = path.relative_to(root).as_posix()
        self.tree = ast.parse(path.read_text(), str(path))
        self.constants: dict[str, list[ast.expr]] = {}
        for node in self.tree.body:
            targets: list[ast.expr] = []
            value: ast.expr | None = None
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            for target in targets:
                if isinstance(target, ast.Name) and value is not None:
                    self.constants.setdefault(target.id, []).append(value)
        self.functions: dict[str, list[ast.FunctionDef | ast.AsyncFunctionDef]] = {}
        for each in ast.walk(self.tree):
            if isinstance(each, ast.FunctionDef | ast.AsyncFunctionDef):
                self.functions.setdefault(each.name, []).append(each)
        self.parents: dict[ast.AST, ast.AST] = {}
        for parent in ast.walk(self.tree):
            for child in ast.iter_child_nodes(parent):
                self.parents[child] = parent

    def helpers(self, name: str) -> list[tuple[_Module, ast.FunctionDef | ast.AsyncFunctionDef]]:
        """The functions called ``name`` of this module, else of its sibling modules: a package split
        into modules (``ops/backup/``) keeps a text-building helper next door, not in every file."""
        local = [(self, function) for function in self.functions.get(name, [])]
        if local:
            return local
        return [
            (sibling, function)
            for sibling in _siblings(self.path, self.root)
            for function in sibling.functions.get(name, [])
        ]

    def function_of(self, node: ast.AST) -> ast.AST | None:
        current = self.parents.get(node)
        while current is not None and not isinstance(current, ast.FunctionDef | ast.AsyncFunctionDef):
            current = self.parents.get(current)
        return current

    def assignments(self, name: str, node: ast.AST) -> list[ast.expr]:
        """What ``name`` may hold where ``node`` uses it: assignments in the enclosing function(s),
        else module constants."""
        function = self.function_of(node)
        while function is not None:
            values: list[ast.expr] = []
            for inner in ast.walk(function):
                if isinstance(inner, ast.Assign):
                    for target in inner.targets:
                        if isinstance(target, ast.Name) and target.id == name:
                            values.append(inner.value)
                elif isinstance(inner, ast.AnnAssign) and inner.value is not None:
                    if isinstance(inner.target, ast.Name) and inner.target.id == name:
                        values.append(inner.value)
                elif (
                    isinstance(inner, ast.AugAssign)
                    and isinstance(inner.target, ast.Name)
                    and inner.target.id == name
                ):
                    values.append(ast.BinOp(ast.Name(name), ast.Add(), inner.value))
            if values:
                return values
            params = function.args  # type: ignore[attr-defined]
            names = [a.arg for a in [*params.posonlyargs, *params.args, *params.kwonlyargs]]
            if name in names:
                return []
            function = self.function_of(function)
        return self.constants.get(name, [])


@functools.cache
def _siblings(path: Path, root: Path) -> tuple[_Module, ...]:
    """The other modules of ``path``'s package, parsed once."""
    return tuple(_Module(other, root) for other in sorted(path.parent.glob("*.py")) if other != path)


def _placeholder(node: ast.expr) -> str:
    """A short name for a computed part, for the page: ``{target.path}`` -> ``<path>``."""
    text = ast.unparse(node)
    words: list[str] = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)
    skip = {"self", "str", "len", "repr", "type", "join", "exc", "name__", "__name__"}
    useful = [w for w in words if w not in skip] or words or ["value"]
    return "<" + useful[-1].strip("_") + ">"


Variant = tuple[tuple[str, ...], str]
"""One way a text can come out: pattern parts and the page form."""


def _texts(module: _Module, node: ast.expr, depth: int = 0) -> list[Variant]:
    """Every text ``node`` may evaluate to, as (parts, display) pairs; computed parts are wild."""
    wild: list[Variant] = [((WILD,), _placeholder(node))]
    if depth > 6:
        return wild
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [((node.value,), node.value)]
    if isinstance(node, ast.JoinedStr):
        variants: list[Variant] = [((), "")]
        for value in node.values:
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                variants = [((*p, value.value), d + value.value) for p, d in variants]
            elif isinstance(value, ast.FormattedValue):
                inner = _texts(module, value.value, depth + 1)
                if len(inner) > 4 or value.conversion == ord("r"):
                    inner = [((WILD,), _placeholder(value.value))]
                variants = [(p + ip, d + idisp) for p, d in variants for ip, idisp in inner][:16]
        return variants
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left = _texts(module, node.left, depth + 1)
        right = _texts(module, node.right, depth + 1)
        return [(lp + rp, ld + rd) for lp, ld in left for rp, rd in right][:16]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        formats = _texts(module, node.left, depth + 1)
        return [(_percent(parts), _percent_display(display)) for parts, display in formats]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "setting_name"
        and node.args
    ):
        return [
            ((ENV_PREFIX, *(p.replace(".", "__") for p in parts)), ENV_PREFIX + d.replace(".", "__"))
            for parts, d in _texts(module, node.args[0], depth + 1)
        ]
    if isinstance(node, ast.Call) and (callee := _callee(node)) is not None:
        # A helper of this module that builds the text (``_summary(...)``): its string returns.
        returned: list[Variant] = []
        for owner, function in module.helpers(callee[0]):
            if function.returns is not None and ast.unparse(function.returns) not in {"str", "str | None"}:
                continue
            for statement in ast.walk(function):
                if isinstance(statement, ast.Return) and statement.value is not None:
                    returned += _texts(owner, statement.value, depth + 1)
        if returned:
            return returned[:16]
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        # A table of texts (``REMOVED[provider]``): every value it holds.
        table: list[Variant] = []
        for value in module.constants.get(node.value.id, []):
            if isinstance(value, ast.Dict):
                for item in value.values:
                    table += _texts(module, item, depth + 1)
        if table:
            return table[:16]
    if isinstance(node, ast.IfExp):
        return (_texts(module, node.body, depth + 1) + _texts(module, node.orelse, depth + 1))[:16]
    if isinstance(node, ast.Attribute) and node.attr in SIDE_PREFIXES:
        section = SIDE_PREFIXES[node.attr]
        return [((section,), section), ((TRANSFER_PREFIX + section,), TRANSFER_PREFIX + section)]
    if isinstance(node, ast.Name):
        values = module.assignments(node.id, node)
        if values:
            found: list[Variant] = []
            for value in values:
                found += _texts(module, value, depth + 1)
            return found[:16]
    return wild


_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*\d*(?:\.\d+)?[sdifrxXeEgGa%]")


def _percent(parts: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for part in parts:
        if part == WILD:
            out.append(part)
            continue
        out.append(_PERCENT.sub(lambda m: "%" if m.group(0) == "%%" else WILD, part))
    return tuple(out)


def _percent_display(display: str) -> str:
    return _PERCENT.sub(lambda m: "%" if m.group(0) == "%%" else "<value>", display)


def _argument(call: ast.Call, where: int | str) -> ast.expr | None:
    if isinstance(where, int):
        if where < len(call.args) and not any(isinstance(a, ast.Starred) for a in call.args[: where + 1]):
            return call.args[where]
        return None
    for keyword in call.keywords:
        if keyword.arg == where:
            return keyword.value
    return None


def _subject_variants(module: _Module, node: ast.expr | None, form: str) -> list[Variant]:
    if node is None:
        return [((WILD,), "<setting>")]
    variants = _texts(module, node)
    if form == "setting":
        # setting_name(): the dotted path spelt as the environment variable.
        return [
            (tuple(p.replace(".", "__") for p in parts), display.replace(".", "__"))
            for parts, display in variants
        ]
    return variants


def _wrap(form: str, subject: list[Variant], text: list[Variant]) -> list[Variant]:
    out: list[Variant] = []
    for sp, sd in subject:
        for tp, td in text:
            if form == "setting":
                out.append(((ENV_PREFIX, *sp, ": ", *tp), f"{ENV_PREFIX}{sd}: {td}"))
            elif form == "option":
                out.append(((*sp, ": ", *tp), f"{sd}: {td}"))
            elif form == "component":
                out.append(((*sp, " is unavailable: ", *tp), f"{sd} is unavailable: {td}"))
    return out


def _kind(module: _Module, node: ast.Call, name: str) -> str:
    if name == "CheckResult":
        return "check"
    if module.rel.startswith("http/") and name in {"message", "unavailable", "unauthorized", "BadRequest"}:
        return "http"
    if name in {"AuthError", "_unauthorized", "_forbidden", "Refusal"}:
        return "http"
    return "raise"


def _check_is_problem(call: ast.Call) -> bool:
    """A ``CheckResult`` line worth documenting: a failure or a warning, not an ``ok``."""
    ok = _argument(call, 1)
    if isinstance(ok, ast.Constant) and ok.value is False:
        return True
    for keyword in call.keywords:
        if keyword.arg == "warning" and isinstance(keyword.value, ast.Constant) and keyword.value.value:
            return True
    return not (isinstance(ok, ast.Constant) and ok.value is True)


def _prints_to_person(call: ast.Call, module: _Module) -> bool:
    """A ``print`` to stderr, or any print in the command modules (their stdout is the report)."""
    for keyword in call.keywords:
        if keyword.arg == "file":
            return ast.unparse(keyword.value) in {"sys.stderr", "stderr"}
    return False


def _from_call(module: _Module, call: ast.Call) -> Iterator[tuple[str, list[Variant]]]:
    callee = _callee(call)
    if callee is None:
        return
    name, bare = callee
    func = call.func
    if (
        name in LOG_METHODS
        and isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Name)
        and func.value.id in LOGGERS
    ):
        node = _argument(call, 0)
        if node is not None:
            yield "log", [(_percent(p), _percent_display(d)) for p, d in _texts(module, node)]
        return
    if name == "print" and bare:
        if _prints_to_person(call, module) and call.args:
            yield "print", _texts(module, call.args[0])
        return
    spec = CALLS.get(name)
    if spec is None or (spec.bare_name_only and not bare):
        return
    if name == "CheckResult" and not _check_is_problem(call):
        return
    node = _argument(call, spec.message)
    if node is None:
        return
    text = _texts(module, node)
    if spec.form == "records":
        text = [
            ((*p, ": ", WILD, " record(s) failed: ", WILD), f"{d}: <n> record(s) failed: <users>")
            for p, d in text
        ]
    elif spec.form == "damaged":
        text = [((WILD, " is damaged: ", *p), f"<backup> is damaged: {d}") for p, d in text]
    elif spec.form != "plain":
        subject = _subject_variants(module, _argument(call, spec.subject or 0), spec.form)
        text = _wrap(spec.form, subject, text)
    yield _kind(module, call, name), text


def _exception_super_texts(module: _Module) -> Iterator[tuple[int, list[Variant]]]:
    """Texts an exception class builds itself (``super().__init__(f"...")``), e.g. errors.py's."""
    for cls in ast.walk(module.tree):
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in ast.walk(cls):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            if node.func.attr != "__init__":
                continue
            target = node.func.value
            is_super = (
                isinstance(target, ast.Call)
                and isinstance(target.func, ast.Name)
                and (target.func.id == "super")
            )
            args = node.args if is_super else node.args[1:]
            for arg in args:
                if isinstance(arg, ast.JoinedStr | ast.BinOp):
                    yield node.lineno, _texts(module, arg)


def source_files(root: Path = SOURCE) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not p.relative_to(root).as_posix().startswith(SKIPPED))


def extract(root: Path = SOURCE) -> list[Message]:
    """Every message in the code, one per distinct (skeleton, file, line)."""
    found: dict[tuple[str, str, int], Message] = {}

    def add(module: _Module, line: int, kind: str, variants: list[Variant]) -> None:
        for parts, display in variants:
            if literal_letters(parts) < MIN_LITERAL:
                continue
            message = Message(tuple(parts), module.rel, line, kind, normalise(display))
            found.setdefault((message.skeleton, module.rel, line), message)

    for path in source_files(root):
        module = _Module(path, root)
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Call):
                for kind, variants in _from_call(module, node):
                    add(module, node.lineno, kind, variants)
        for node in ast.walk(module.tree):
            # JSON bodies written by hand (the ASGI middlewares answer before Starlette does).
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "message" and value is not None:
                        add(module, value.lineno, "http", _texts(module, value))
        for line, variants in _exception_super_texts(module):
            add(module, line, "raise", variants)
    return sorted(found.values(), key=lambda m: (m.file, m.line, m.skeleton))


def exception_classes(root: Path = SOURCE) -> dict[str, str]:
    """Every exception class defined under src/ (name -> file), for the completeness check."""
    known_bases = {"Exception", "KeyConnectorError", "ValueError", "RuntimeError"}
    classes: dict[str, tuple[str, list[str]]] = {}
    for path in source_files(root):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b).split(".")[-1] for b in node.bases]
                classes[node.name] = (path.relative_to(root).as_posix(), bases)
    result: dict[str, str] = {}
    changed = True
    exceptions = set(known_bases)
    while changed:
        changed = False
        for name, (_, bases) in classes.items():
            if name not in exceptions and any(b in exceptions or b.endswith("Error") for b in bases):
                exceptions.add(name)
                changed = True
    for name, (file, _) in classes.items():
        if name in exceptions:
            result[name] = file
    return result


# --------------------------------------------------------------------------------------------------
# The comparison


@dataclass
class Report:
    undocumented: list[Message]
    stale: list[tuple[int, str]]
    messages: list[Message]
    entries: list[tuple[int, str]]


def compare(page_text: str, messages: list[Message]) -> Report:
    entries = page_entries(page_text)
    documented = {skeleton_of_entry(text) for _, text in entries}
    in_code = {m.skeleton for m in messages}
    undocumented = [m for m in messages if m.skeleton not in documented]
    stale = [(line, text) for line, text in entries if skeleton_of_entry(text) not in in_code]
    return Report(undocumented, stale, messages, entries)


def main(argv: Sequence[str]) -> int:
    messages = extract()
    page = PAGE.read_text() if PAGE.exists() else ""
    report = compare(page, messages)
    distinct = {m.skeleton for m in messages}
    print(
        f"{len(messages)} message sites, {len(distinct)} distinct messages; "
        f"{len(report.entries)} page entries"
    )
    if "--index" in argv:
        PAGE.write_text(with_index(page))
        print(f"wrote the index of {PAGE.relative_to(ROOT)}")
        return 0
    if "--all" in argv:
        for m in messages:
            print(f"{m.where()}\t{m.kind}\t- `{m.display}`")
        return 0
    seen: set[str] = set()
    if report.undocumented:
        print(f"\nnot on {PAGE.relative_to(ROOT)} ({len({m.skeleton for m in report.undocumented})}):")
        for m in report.undocumented:
            if m.skeleton in seen:
                continue
            seen.add(m.skeleton)
            print(f"  {m.where()} [{m.kind}]\n    - `{m.display}`")
    if report.stale:
        print(f"\non the page but no longer in the code ({len(report.stale)}):")
        for line, text in report.stale:
            print(f"  line {line}: {text}")
    return 1 if report.undocumented or report.stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
