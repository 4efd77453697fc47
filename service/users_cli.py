"""``rtcontour users``: add, list, disable/enable users and issue tokens.

Tokens are printed once, at creation; the database keeps only their SHA-256. Every change is
written to the audit log with the operating-system user as the actor. The command says which
database it uses (on stderr) and never creates one unless given ``--create``: run from another
folder, the default ``./var`` would otherwise be a new, empty database the service never reads.

Examples
--------
    rtcontour users add dr-smith --role clinician
    rtcontour users list
    rtcontour users disable dr-smith
    rtcontour users token dr-smith        # new token, previous ones revoked
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from sqlalchemy import Engine, inspect, make_url
from sqlalchemy.orm import Session

from rtcontour.common import audit
from rtcontour.common.auth import (
    Role,
    UserError,
    active_token_count,
    add_user,
    issue_token,
    list_users,
    parse_role,
    set_active,
    set_role,
)
from rtcontour.common.db import make_engine
from rtcontour.common.errors import ConfigurationError
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtcontour users",
        description="Manage API users and their tokens in the service's database "
        "(RTCONTOUR_DATABASE_URL, else rtcontour.db in RTCONTOUR_DATA_DIR, default ./var).",
    )
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument(
        "--create", action="store_true",
        help="create the database if there is none (otherwise refused: a wrong folder or URL "
        "would give a new, empty one)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add_parser(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, parents=[database])

    add = add_parser("add", "add a user and print its token (once)")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=[r.value for r in Role])
    add_parser("list", "list users, roles and states")
    for name, help_ in (
        ("disable", "disable a user (its tokens stop working)"),
        ("enable", "enable a disabled user"),
    ):
        command = add_parser(name, help_)
        command.add_argument("name")
    token = add_parser("token", "issue a new token for a user and print it (once)")
    token.add_argument("name")
    token.add_argument("--keep-old", action="store_true", help="do not revoke previous tokens")
    role = add_parser("role", "change a user's role")
    role.add_argument("name")
    role.add_argument("role", choices=[r.value for r in Role])
    return parser


def _say(text: str) -> None:
    """Command output (a CLI prints; library code logs)."""
    sys.stdout.write(text + "\n")


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no login name in some containers
        return "cli"


def _open_database(settings: Settings, *, create: bool) -> Engine:
    """The engine of the service's database, said on stderr; refused if absent unless
    ``create`` (then its tables are created)."""
    url = make_url(settings.effective_database_url)
    sqlite_file = Path(url.database or "") if url.get_backend_name() == "sqlite" else None
    where = str(sqlite_file) if sqlite_file else url.render_as_string(hide_password=True)
    sys.stderr.write(f"rtcontour users: using the database {where}\n")
    refusal = (
        f"there is no rtcontour database at {where}"
        + (
            f" (RTCONTOUR_DATA_DIR {settings.data_dir} is relative to the folder {Path.cwd()})"
            if sqlite_file and not settings.data_dir.is_absolute()
            else ""
        )
        + ": set RTCONTOUR_DATA_DIR or RTCONTOUR_DATABASE_URL as the service has them, "
        "or add --create to make a new, empty one"
    )
    if sqlite_file and not sqlite_file.exists() and not create:
        raise ConfigurationError(refusal)  # checked first: connecting would create the file
    engine = make_engine(settings)
    if not create and not inspect(engine).has_table("api_users"):
        engine.dispose()
        raise ConfigurationError(refusal)
    create_schema(engine)
    return engine


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings.model_validate({})
    engine = _open_database(settings, create=args.create)
    actor = _actor()
    try:
        with Session(engine) as session, session.begin():
            if args.command == "add":
                user, token = add_user(session, args.name, parse_role(args.role))
                audit.record(
                    session, audit.USER_ADDED, actor, {"user": user.name, "role": user.role}
                )
                _say(f"added {user.name} ({user.role}); token (shown once):")
                _say(token)
            elif args.command == "list":
                users = list_users(session)
                _say(f"{'name':<24} {'role':<10} {'state':<9} tokens")
                for user in users:
                    state = "active" if user.active else "disabled"
                    tokens = active_token_count(session, user.id)
                    _say(f"{user.name:<24} {user.role:<10} {state:<9} {tokens}")
            elif args.command in ("disable", "enable"):
                set_active(session, args.name, args.command == "enable")
                event = audit.USER_ENABLED if args.command == "enable" else audit.USER_DISABLED
                audit.record(session, event, actor, {"user": args.name})
                _say(f"{args.command}d {args.name}")
            elif args.command == "token":
                token = issue_token(session, args.name, revoke_others=not args.keep_old)
                audit.record(session, audit.TOKEN_ISSUED, actor, {"user": args.name})
                _say(f"new token for {args.name} (shown once):")
                _say(token)
            elif args.command == "role":
                set_role(session, args.name, parse_role(args.role))
                audit.record(
                    session, audit.USER_ROLE_CHANGED, actor, {"user": args.name, "role": args.role}
                )
                _say(f"{args.name} is now {args.role}")
    except UserError as error:
        sys.stderr.write(f"rtcontour users: {error}\n")
        return 1
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
