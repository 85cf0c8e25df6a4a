"""File operations that a producer sharing the spool cannot redirect.

Producers in the spool group can create and rename entries in `tmp/` and `new/`. Every path the
daemon resolves is therefore a race: between a check and a use, a name can become a symlink, a
FIFO or another file. The primitives here work on directory descriptors opened once with
`O_NOFOLLOW`, open files with `O_NOFOLLOW | O_NONBLOCK` and check them with `fstat`, create
files with `O_EXCL`, and never rename over an existing name.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


class UnsafeFileError(OSError):
    """A name in the spool refers to something other than a regular file of its own."""


def _load_renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def open_dir(path: Path | str, dir_fd: int | None = None) -> int:
    """A descriptor of the directory `path` itself; refuses a symlink in its last component."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


@contextlib.contextmanager
def directory(path: Path | str, dir_fd: int | None = None) -> Iterator[int]:
    """`open_dir` as a context manager that closes the descriptor."""
    fd = open_dir(path, dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def open_regular(dir_fd: int, name: str) -> tuple[int, os.stat_result]:
    """Open `name` in `dir_fd` for reading, once, and prove it is a plain regular file.

    `O_NOFOLLOW` refuses a symlink, `O_NONBLOCK` keeps a FIFO from blocking the open, and `fstat`
    on the descriptor (not the name) says what was really opened.
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(errno.ELOOP, "a symlink, refused") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise UnsafeFileError(errno.EINVAL, kind)
    # Reads of a regular file never block; clear the flag so ordinary file objects behave.
    os.set_blocking(fd, True)
    return fd, info


def same_file(dir_fd: int, name: str, info: os.stat_result) -> bool:
    """Whether `name` in `dir_fd` still refers to the inode described by `info`."""
    try:
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino)


def create_exclusive(dir_fd: int, name: str, mode: int) -> int:
    """A new file `name` in `dir_fd` for writing; fails with FileExistsError if anything has that name."""
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)


def open_append(dir_fd: int, name: str, mode: int) -> int:
    """`name` in `dir_fd` for appending, created if missing; refuses a symlink or a non-regular file."""
    fd = os.open(
        name,
        os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
        mode,
        dir_fd=dir_fd,
    )
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFileError(errno.EINVAL, f"{name} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def write_new(dir_fd: int, name: str, data: bytes, mode: int = 0o640) -> None:
    """Write `data` to a new file `name` in `dir_fd` durably; never replaces or follows anything."""
    fd = create_exclusive(dir_fd, name, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_noreplace(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """Move `src` to `dst`, failing with FileExistsError rather than replacing whatever `dst` is.

    renameat2(RENAME_NOREPLACE) where the kernel and filesystem have it, else link then unlink
    (link never replaces either; a crash in between leaves both names, which callers tolerate).
    """
    if _renameat2 is not None:
        result = _renameat2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), _RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), dst)
    os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
    os.unlink(src, dir_fd=src_dir_fd)


def exists(dir_fd: int, name: str) -> bool:
    """Whether anything (a symlink included) has this name in `dir_fd`."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def fsync_dir(dir_fd: int) -> None:
    os.fsync(dir_fd)


def display_name(name: str) -> str:
    """A file name safe to print and store: undecodable bytes (surrogate escapes) shown as \\xNN."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    return name
