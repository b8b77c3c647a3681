"""The ``keyconnector`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from keyconnector.cli.conventions import Parser, finish, log_level
from keyconnector.errors import ExitCode, UsageError, exit_code_for, setting_name

if TYPE_CHECKING:
    from keyconnector.runtime.settings import LoadedSettings, Settings

# What this module imports at its top is what every Tab of shell completion pays for (it runs
# ``main``): the settings model (pydantic) and every command's own modules are imported where used.

log = logging.getLogger("keyconnector")


def _load(args: argparse.Namespace) -> LoadedSettings:
    from keyconnector.runtime.settings import load_with_env_file

    loaded = load_with_env_file(getattr(args, "env_file", None), getattr(args, "config", None))
    loaded.warn_unknown(log)
    return loaded


def cmd_serve(args: argparse.Namespace) -> int:
    from keyconnector.runtime import logs, server
    from keyconnector.runtime.tlspair import check_tls_pair

    loaded = _load(args)
    settings = _takeover_options(loaded.settings, args)
    logs.configure(settings.logging)
    notice = loaded.upstream_logging_notice()
    if notice:
        log.info("%s", notice)
    # Validate before writing: every check that needs no network comes before the first write
    # (schema, data key), and the port is taken before anything is written or "listening" said.
    listen = server.listen_address(args.host, args.port)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert", "--tls-cert and --tls-key go together")
    server.check_https(listen, args.tls_cert, args.tls_key)
    if args.workers < 1:
        raise UsageError("--workers", f"{args.workers} is not a number of worker processes; use 1 or more")
    listening = server.take_port(listen)
    if args.tls_cert and args.tls_key:
        check_tls_pair(args.tls_cert, args.tls_key)
    server.preflight(settings, tls_key=args.tls_key)
    if settings.transfer_to.lockfile_path:
        from keyconnector.ops.transfer import run_startup_transfer

        # Upstream's start-up transfer, done safely: a failure stops serve before it listens.
        run_startup_transfer(settings)
    server.run(
        settings,
        listen,
        workers=args.workers,
        config_file=args.config,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        sock=listening,
    )
    return 0


def _takeover_options(settings: Settings, args: argparse.Namespace) -> Settings:
    """``--allow-new-data-key`` and ``--create-schema``: their ``database`` settings, for this start
    only (the pre-flight is the one place that makes a data key or a schema)."""
    given = {"allow_new_data_key": args.allow_new_data_key, "create_schema": args.create_schema}
    changes = {name: True for name, on in given.items() if on}
    if not changes:
        return settings
    return settings.model_copy(update={"database": settings.database.model_copy(update=changes)})


def cmd_init(args: argparse.Namespace) -> int:
    from keyconnector.keypairs.generate import new_password, self_signed_pfx
    from keyconnector.runtime.settings import IDENTITY_PLACEHOLDER, WEB_VAULT_PLACEHOLDER
    from keyconnector.runtime.settings.views import PLACEHOLDER_DOMAIN

    folder = Path(args.directory).resolve()
    pfx = folder / "key.pfx"
    password_file = folder / "key.pfx.password"
    env_file = folder / "keyconnector.env"
    database = folder / "keyconnector.db"
    existing = [str(p) for p in (pfx, password_file, env_file) if p.exists()]
    if existing:
        print(f"keyconnector init: not overwriting {', '.join(existing)}", file=sys.stderr)
        return 1
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    identity = args.identity_server_uri or IDENTITY_PLACEHOLDER
    web_vault = args.web_vault_uri or WEB_VAULT_PLACEHOLDER
    placeholders = [
        f"{setting_name(setting)} (no {option})"
        for setting, given, option in (
            ("identityServerUri", args.identity_server_uri, "--identity-server-uri"),
            ("webVaultUri", args.web_vault_uri, "--web-vault-uri"),
        )
        if not given
    ]
    password = new_password()
    print(f"making an RSA-{args.key_bits} key pair (this takes a few seconds) ...", file=sys.stderr)
    blob = self_signed_pfx(password, bits=args.key_bits)
    _write_private(password_file, password + "\n")
    _write_private(pfx, blob)
    _write_private(
        env_file,
        "\n".join(
            [
                "# Key Connector settings, upstream names, docker env-file format (values unquoted).",
                f"# Use: keyconnector serve --env-file {env_file}   or   docker run --env-file ...",
                *(
                    [f"# Replace every *.{PLACEHOLDER_DOMAIN} URL below: serve and check refuse them."]
                    if placeholders
                    else []
                ),
                f"keyConnectorSettings__webVaultUri={web_vault}",
                f"keyConnectorSettings__identityServerUri={identity}",
                "keyConnectorSettings__database__provider=sqlite",
                f"keyConnectorSettings__database__sqliteConnectionString=Data Source={database}",
                "keyConnectorSettings__rsaKey__provider=certificate",
                "keyConnectorSettings__certificate__provider=filesystem",
                f"keyConnectorSettings__certificate__filesystemPath={pfx}",
                f"keyConnectorSettings__certificate__filesystemPasswordFile={password_file}",
                "",
            ]
        ),
    )
    print(f"wrote {pfx}, {password_file} and {env_file}", file=sys.stderr)
    if placeholders:
        # Development values here would end up in a deployment and fail later, at a login; a
        # placeholder fails now, by name, in `check` and `serve`.
        print(
            f"keyconnector init: wrote a placeholder (*.{PLACEHOLDER_DOMAIN}) for "
            f"{' and '.join(placeholders)}: replace it in {env_file} before `keyconnector serve`; "
            "serve and check refuse a placeholder",
            file=sys.stderr,
        )
    return 0


def _write_private(path: Path, content: str | bytes) -> None:
    data = content.encode() if isinstance(content, str) else content
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def cmd_demo(args: argparse.Namespace) -> int:
    from keyconnector.devtools.demo import run_demo

    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    from keyconnector.runtime.settings import IDENTITY_PLACEHOLDER, WEB_VAULT_PLACEHOLDER

    parser = Parser(prog="keyconnector", description="A drop-in Bitwarden Key Connector.")
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the version, its commit, Python's and OpenSSL's versions",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve the Key Connector API",
        description="Serve the Key Connector API (upstream's endpoints, plus /health/live and "
        "/health/ready). Before listening it checks the settings, migrates the schema (waiting for the "
        "database) and creates the data key if there is none; any setting that is wrong stops it here, "
        "by name, with exit code 2.",
    )
    serve.add_argument("--host", help="address to listen on (default: ASPNETCORE_URLS, else 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: ASPNETCORE_URLS, else 5000)")
    serve.add_argument("--config", help="an appsettings-style JSON file (section keyConnectorSettings)")
    serve.add_argument("--env-file", help="a docker-style env file of keyConnectorSettings__... lines")
    serve.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain")
    serve.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument(
        "--allow-new-data-key",
        action="store_true",
        help="make a new data key even though the database holds user records (they become unreadable)",
    )
    serve.add_argument(
        "--create-schema",
        action="store_true",
        help="create Key Connector's schema in a database that holds only another application's tables",
    )
    serve.set_defaults(func=cmd_serve)

    init = commands.add_parser(
        "init",
        help="make a new key pair (PFX) and an env file that uses it",
        description="Make a new deployment's files in DIRECTORY: a self-signed RSA PFX (key.pfx), its "
        "random password in a 0600 file (key.pfx.password) and an env file (keyconnector.env) with "
        "upstream's setting names, a SQLite database beside them. Never overwrites. Without "
        "--identity-server-uri or --web-vault-uri it writes placeholders (*.replace-me.invalid) that "
        "serve and check refuse until they are replaced.",
    )
    init.add_argument("directory", nargs="?", default=".", help="where to write the three files")
    init.add_argument(
        "--key-bits", type=int, default=4096, choices=[2048, 3072, 4096], help="size of the RSA key pair"
    )
    init.add_argument(
        "--identity-server-uri",
        metavar="URL",
        help="the Bitwarden identity server, like https://vault.example.com/identity "
        f"(default: the placeholder {IDENTITY_PLACEHOLDER})",
    )
    init.add_argument(
        "--web-vault-uri",
        metavar="URL",
        help="the web vault's origin, allowed by CORS, like https://vault.example.com "
        f"(default: the placeholder {WEB_VAULT_PLACEHOLDER})",
    )
    init.set_defaults(func=cmd_init)

    from keyconnector.cli import manpage
    from keyconnector.ops import add_commands

    # check, config show, status, then the operations (ops.OPERATIONS' order); the demo last.
    add_commands(commands)
    manpage.add_commands(commands)

    demo = commands.add_parser("demo", help="run a development issuer and the service, and show the flow")
    demo.set_defaults(func=cmd_demo)
    return finish(parser)


class _VersionAction(argparse.Action):
    """``--version``, computed only when asked (it runs ``git`` to find the commit)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from keyconnector.cli.version import version_text

        print(version_text())
        parser.exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit code follows ``errors.ExitCode`` for every command."""
    if argv is None and "_ARGCOMPLETE" in os.environ:
        from keyconnector.cli.completion import complete

        complete(build_parser)  # answers the shell and exits
    args = build_parser().parse_args(argv)
    from keyconnector.runtime import logs
    from keyconnector.runtime.settings import LoggingSettings

    level = log_level(args)
    if level:
        logs.override_level(level)

    logs.configure(LoggingSettings())
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        code = exit_code_for(exc)
        _report_failure(args, exc, code)
    return code


def _report_failure(args: argparse.Namespace, exc: Exception, code: ExitCode) -> None:
    """One line on stderr (and with ``--json`` one document on stdout), without a traceback for
    what was raised on purpose; a bug's traceback with ``-v``."""
    if code is ExitCode.INTERNAL:
        where = exc.__traceback__
        while where is not None and where.tb_next is not None:
            where = where.tb_next
        place = f" at {Path(where.tb_frame.f_code.co_filename).name}:{where.tb_lineno}" if where else ""
        if getattr(args, "verbose", 0):
            log.exception("internal error (a bug, please report it with this traceback)")
        # An unexpected exception's message may quote anything (a URL, a driver's error): its type
        # and place only; the traceback (with -v) is the operator's choice.
        name = type(exc).__name__
        message = f"internal error ({name}{place}): a bug; run again with -v and please report it"
    elif code is ExitCode.USAGE:
        message = f"configuration error: {exc}"
    else:
        message = str(exc)
    print(f"keyconnector: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        from keyconnector.ops.report import emit_json

        emit_json({"ok": False, "exit_code": int(code), "error": message})


if __name__ == "__main__":
    sys.exit(main())
