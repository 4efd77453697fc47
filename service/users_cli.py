"""``rtcontour users``: add, list, disable/enable users and issue tokens.

Tokens are printed once, at creation; the database keeps only their SHA-256. Every change is
written to the audit log with the operating-system user as the actor.

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

from sqlalchemy.orm import Session

from common import audit
from common.auth import (
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
from common.db import make_engine
from common.schema import create_schema
from common.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtcontour users", description="manage API users")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add a user and print its token (once)")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=[r.value for r in Role])
    sub.add_parser("list", help="list users, roles and states")
    for name, help_ in (
        ("disable", "disable a user (its tokens stop working)"),
        ("enable", "enable a disabled user"),
    ):
        command = sub.add_parser(name, help=help_)
        command.add_argument("name")
    token = sub.add_parser("token", help="issue a new token for a user and print it (once)")
    token.add_argument("name")
    token.add_argument("--keep-old", action="store_true", help="do not revoke previous tokens")
    role = sub.add_parser("role", help="change a user's role")
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings.model_validate({})
    engine = make_engine(settings)
    create_schema(engine)
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
