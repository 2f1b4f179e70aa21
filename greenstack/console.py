"""Terminal output helpers shared by the commands: a rich Console that does not wrap piped tables,
and counts with the right plural ("1 problem", "2 problems").

Why: rich falls back to 80 columns when stdout is not a terminal, so `greenstack ls | less` or a
job table written to a log split every path over several lines. Piped output has no width to fit,
so it gets a wide one (an explicit `COLUMNS` still wins).
"""

from __future__ import annotations

import os
from typing import IO, Any

PIPE_WIDTH = 1000  # columns used when the output is not a terminal and COLUMNS is unset


def make_console(*, stderr: bool = False, file: IO[str] | None = None, min_width: int = 0,
                 **kwargs: Any) -> Any:
    """A rich Console (no highlighting); wide when writing to a pipe or file, so tables do not wrap;
    on a terminal at least `min_width` columns."""
    from rich.console import Console

    kwargs.setdefault("highlight", False)
    console = Console(stderr=stderr, file=file, **kwargs)
    if "width" not in kwargs:
        if not console.is_terminal and not os.environ.get("COLUMNS"):
            console.width = PIPE_WIDTH
        elif console.width < min_width:
            console.width = min_width
    return console


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """'1 problem', '2 problems', '1 entry' / '3 entries' (pass `plural_form` for irregular nouns)."""
    if count == 1:
        return f"{count} {noun}"
    if plural_form is None:
        plural_form = noun[:-1] + "ies" if noun.endswith("y") and noun[-2:-1] not in "aeiou" else noun + "s"
    return f"{count} {plural_form}"
