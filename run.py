"""Start botgate: `python run.py [--config PATH] [--env-file PATH] [--check-config]`, or check its
surroundings: `python run.py doctor [--config PATH]`, or manage the admin login token (used while no
admin password is set): `python run.py login-link` prints the login link, `python run.py
rotate-login-token` replaces the token (every session made with the old one ends), or copy the
SQLite store while the gateway runs: `python run.py backup FILE [--force]` (docs/deploy.md)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from pathlib import Path

import handlers
from gateway import __version__, doctor, envfile
from gateway.app import create_app
from gateway.auth import LOGIN_TOKEN_FILE, LoginToken, audit, login_url
from gateway.backends import uses_echo
from gateway.backup import BackupFailed, BackupRefused, backup
from gateway.config import Config, ConfigError, load
from gateway.errors import StoreError
from gateway.logs import JsonFormatter, setup_logging
from gateway.sdnotify import Notifier
from gateway.server import Service, ssl_context

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.toml"
log = logging.getLogger("botgate")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py", description="botgate chat gateway")
    parser.add_argument(
        "command",
        nargs="?",
        choices=["serve", "doctor", "login-link", "rotate-login-token", "backup"],
        default="serve",
        help="serve (default); doctor: check credentials, endpoints, clock, model and store, then exit; "
        "login-link: print the admin login link; rotate-login-token: replace the admin login token; "
        "backup FILE: copy the SQLite store to FILE (a directory: a new file named by the time in it)",
    )
    parser.add_argument("file", nargs="?", help="backup: where the copy goes")
    parser.add_argument("--config", help="path to config.toml (default: the one next to run.py)")
    parser.add_argument(
        "--env-file",
        action="append",
        default=[],
        metavar="PATH",
        help="read BOTGATE_... variables from PATH as systemd's EnvironmentFile= does (values literal, "
        "nothing run); they win over the environment; may be given more than once",
    )
    parser.add_argument("--force", action="store_true", help="backup: replace FILE if it exists")
    parser.add_argument("--check-config", action="store_true", help="validate the config and exit")
    parser.add_argument("--version", action="version", version=f"botgate {__version__}")
    args = parser.parse_args(argv)
    if (args.command == "backup") != (args.file is not None):
        parser.error("FILE goes with backup only: run.py backup FILE" if args.file else "backup needs FILE")
    return args


def load_config(path: str | None) -> Config:
    if path is not None:
        return load(path)
    return load(DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)


def backup_command(config: Config, file: str, force: bool) -> int:
    try:
        result = backup(config, file, overwrite=force)
    except BackupRefused as e:
        print(f"backup refused: {e}", file=sys.stderr)
        return 2
    except BackupFailed as e:
        print(f"backup failed: {e}", file=sys.stderr)
        return 1
    print(
        f"backup ok: {result.source} -> {result.target} ({result.size} bytes, schema version "
        f"{result.schema_version}, {result.pending} messages not yet answered)"
    )
    return 0


def login_token_command(config: Config, rotate: bool) -> int:
    """Print (after replacing it, for `rotate`) the login link of the token in the state directory."""
    if config.store.url.startswith("memory://"):
        print("store.url is memory://: the login token is kept in the running process only (its log has the link);"
              " a restart makes a new one", file=sys.stderr)  # fmt: skip
        return 2
    token, path = LoginToken(config.state_dir), (config.state_dir / LOGIN_TOKEN_FILE).absolute()
    try:
        value = token.rotate() if rotate else token.current()
    except OSError as e:
        print(f"cannot replace {path}: {e.strerror or e}", file=sys.stderr)
        return 2
    if not token.stored:  # current() could not read or create the file (and said why)
        return 2
    if rotate:
        handler = logging.StreamHandler(sys.stderr)  # stdout carries only the link
        handler.setFormatter(JsonFormatter(config.secrets()))
        logging.getLogger().handlers[:] = [handler]
        audit("login_token.rotate", "ok", actor="local command", os_user=getpass.getuser(), path=str(path))
        print("login token replaced: the old one and every session made with it no longer work", file=sys.stderr)
    if config.admin.password:
        print("note: [admin] password is set, so log in with the password; the token is not accepted", file=sys.stderr)
    print(login_url(config.server, value))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        for path in args.env_file:  # as systemd would set them: into this process's environment
            os.environ.update(envfile.read(path))
    except envfile.EnvFileError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
        tls = ssl_context(config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"config ok: {config.source}")
        return 0
    if args.command == "doctor":
        return asyncio.run(doctor.run(config, [handlers.doctor]))
    if args.command == "backup":
        return backup_command(config, args.file, args.force)
    if args.command in ("login-link", "rotate-login-token"):
        return login_token_command(config, rotate=args.command == "rotate-login-token")
    setup_logging(config.log.level, config.secrets())
    app = create_app(config, [handlers.setup])
    service = Service(app, config, notifier=Notifier(), tls=tls)
    m = config.model
    log.info(
        "starting",
        extra={
            "version": __version__,
            "listen_host": config.server.host,
            "port": config.server.port,
            "config": config.source,
            # Say plainly when no model is configured: every answer will be an echo.
            "model": "echo" if uses_echo(config.model) else f"{m.model} at {m.base_url}",
        },
    )
    try:
        asyncio.run(service.run())
    except StoreError as e:
        log.error("store unavailable at start: %s", e)
        print(f"store error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        log.error("cannot serve: %s", e)
        print(f"cannot serve on {config.server.host}:{config.server.port}: {e}", file=sys.stderr)
        return 2
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
