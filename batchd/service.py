"""`batchd init-service`: the systemd units and the example configuration that ship inside the package.

They live in the repository as systemd/ and config.example.toml and are installed as package data
(batchd/data/), so an operator who installed batchd with pip has them without a checkout.
"""

from __future__ import annotations

import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from .exits import EX_CANTCREAT, OperatorError, creating_status, reason

# name in the package's data -> where the README installs it
SERVICE_FILES = {
    "systemd/batchd.service": "/etc/systemd/system/batchd.service",
    "systemd/batchd.sysusers": "/etc/sysusers.d/batchd.conf",
    "systemd/batchd.tmpfiles": "/etc/tmpfiles.d/batchd.conf",
    "config.example.toml": "/etc/batchd/batchd.toml",
}


def _data() -> Traversable:
    return resources.files("batchd").joinpath("data")


def service_files() -> dict[str, bytes]:
    """Each shipped file's name (as in the repository) and content."""
    data = _data()
    return {name: data.joinpath(name).read_bytes() for name in SERVICE_FILES}


def print_service_files() -> str:
    """Every file, each after a comment line naming it and where it is installed."""
    parts = []
    for name, content in service_files().items():
        parts.append(f"# ==> {name} (install as {SERVICE_FILES[name]}) <==\n{content.decode()}")
    return "\n".join(parts)


def write_service_files(directory: Path) -> dict[str, Path]:
    """Write the files into `directory` (made if missing), never over an existing file; name -> path written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OperatorError(f"cannot create {directory}: {reason(exc)}", creating_status(exc)) from None
    written: dict[str, Path] = {}
    for name, content in service_files().items():
        target = directory / Path(name).name
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            message = f"{target} exists: not replaced (remove it or pick another --write DIR)"
            raise OperatorError(message, EX_CANTCREAT) from None
        except OSError as exc:
            raise OperatorError(f"cannot write {target}: {reason(exc)}", creating_status(exc)) from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        written[name] = target
    return written
