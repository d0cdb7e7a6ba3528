"""The ``machinable`` command: a thin typer app over the Python API.

Every command calls public functions; nothing here is needed by the API.
Heavy modules (GitPython, sqlite3, rich tables, user code) are imported
inside the commands, never at module level, so ``--help`` stays fast.

(Skeleton: the CLI issue fills in the seed grammar; each area adds its
subcommands as separate functions below.)
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(add_completion=True, no_args_is_help=True, help="machinable: content-addressed, git-integrated experiments.")


# --- commands ----------------------------------------------------------------------


def main() -> None:
    from machinable.errors import MachinableError

    try:
        app()
    except MachinableError as e:
        print(f"Error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None


if __name__ == "__main__":
    main()
