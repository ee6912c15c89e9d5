"""How a command fails: one line `error: ...` on stderr and an exit code, never a traceback.

Exit codes: 0 success, 1 a negative answer the command exists to give (rows rejected, a spec that
is invalid, a promotion refused), 2 input or state the command cannot use.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

EXIT_OK, EXIT_NEGATIVE, EXIT_UNUSABLE = 0, 1, 2


def fail(message: str, code: int = EXIT_UNUSABLE) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise (`raise fail(...) from None`)."""
    # soft_wrap: paths and messages stay whole on one line, to be copied or grepped.
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=code)
