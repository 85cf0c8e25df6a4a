"""Exit statuses (the sysexits.h family) and the error that carries one to the command line.

An operator's mistake (a wrong flag, a missing file, a directory the daemon may not write, a
second daemon on one state directory) is an `OperatorError`: the command line prints its message
in one line on stderr and exits with its status, never with a Python traceback. Scripts and
systemd can tell the kinds apart by the status alone.
"""

from __future__ import annotations

import errno

EX_USAGE = 64  # a wrong flag or value on the command line
EX_DATAERR = 65  # the database is not one this batchd can read (schema older or newer than the code)
EX_NOINPUT = 66  # an input file or the database does not exist
EX_CANTCREAT = 73  # a directory or file cannot be created (a path through a file, a read-only file system)
EX_IOERR = 74  # reading or writing failed (EIO, ENOSPC, a closed output)
EX_TEMPFAIL = 75  # another daemon holds the state directory's lock
EX_NOPERM = 77  # permission denied
EX_CONFIG = 78  # the configuration cannot be used; systemd shows it as a configuration error

_PERMISSION = frozenset({errno.EACCES, errno.EPERM})
_CANNOT_CREATE = frozenset({errno.ENOTDIR, errno.EEXIST, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR})
_MISSING = frozenset({errno.ENOENT, errno.ENOTDIR})


class OperatorError(Exception):
    """Something the operator can fix, reported in one line with a distinct exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    @property
    def line(self) -> str:
        """The message on one line: a multi-part message (several config problems) joined by '; '."""
        return "; ".join(part.strip() for part in str(self).splitlines() if part.strip())


def reason(exc: OSError) -> str:
    """The OS's words for an error, without Python's `[Errno N]` prefix or a repeated path."""
    return exc.strerror or str(exc)


def creating_status(exc: OSError) -> int:
    """The exit status for a failure to create or write a file or directory."""
    if exc.errno in _PERMISSION:
        return EX_NOPERM
    if exc.errno in _CANNOT_CREATE or exc.errno == errno.ENOENT:
        return EX_CANTCREAT
    return EX_IOERR


def reading_status(exc: OSError) -> int:
    """The exit status for a failure to open or read an input."""
    if exc.errno in _PERMISSION:
        return EX_NOPERM
    if exc.errno in _MISSING or exc.errno == errno.EISDIR:
        return EX_NOINPUT
    return EX_IOERR
