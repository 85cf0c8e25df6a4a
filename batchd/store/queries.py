"""Named queries: each engine keeps its SQL in one file of `-- name: NAME` blocks.

    -- name: claim_items
    -- Move a group's oldest due items into a batch.
    UPDATE items SET ...

`load("sqlite_queries.sql")` returns an object whose attributes are the statements, so engine code
reads `Q.claim_items` and no SQL text lives in Python.
"""

from __future__ import annotations

import re
from importlib import resources

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$")


class Queries:
    """The statements of one `.sql` file, by name."""

    def __init__(self, statements: dict[str, str]) -> None:
        self._statements = statements

    def __getattr__(self, name: str) -> str:
        try:
            return self._statements[name]
        except KeyError:
            raise AttributeError(f"no query named {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._statements

    @property
    def names(self) -> list[str]:
        return sorted(self._statements)


def parse(text: str) -> Queries:
    statements: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        match = _NAME.match(line.strip())
        if match:
            if name is not None:
                statements[name] = "\n".join(lines).strip().rstrip(";")
            name, lines = match.group(1), []
            if name in statements:
                raise ValueError(f"query {name!r} defined twice")
        elif name is not None and not line.strip().startswith("--"):
            lines.append(line)
    if name is not None:
        statements[name] = "\n".join(lines).strip().rstrip(";")
    return Queries(statements)


def load(file_name: str) -> Queries:
    """The named queries of batchd/store/FILE_NAME."""
    return parse(resources.files("batchd.store").joinpath(file_name).read_text())
