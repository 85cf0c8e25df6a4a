"""`[store] url`, in the SQLAlchemy convention.

sqlite:////var/lib/batchd/batchd.sqlite3     (four slashes: an absolute path)
sqlite:///relative/path.sqlite3               (three: relative to the working directory)
postgresql://user@host:5432/db               (also postgres://, postgresql+asyncpg://)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True, slots=True)
class StoreURL:
    engine: str  # "sqlite" | "postgresql"
    url: str
    path: Path | None = None  # sqlite only

    def redacted(self) -> str:
        """The URL without its password, for logs and status."""
        if self.engine != "postgresql":
            return self.url
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))


def parse_store_url(url: str) -> StoreURL:
    """Parse a store URL; ValueError with a one-line reason when it is not one."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path:
            raise ValueError("a sqlite URL needs a path: sqlite:////var/lib/batchd/batchd.sqlite3")
        return StoreURL("sqlite", url, Path(path))
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg", "postgresql+psycopg"):
        rest = url.split("://", 1)[1]
        return StoreURL("postgresql", f"postgresql://{rest}")
    raise ValueError(f"unknown store URL {url!r}: use sqlite:////ABSOLUTE/PATH.sqlite3 or postgresql://user@host/db")
