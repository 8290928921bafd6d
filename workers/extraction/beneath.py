"""Open a path beneath one of a set of roots so that nothing swapped in after a check can
redirect the open: the check is the open.

The rule: a root's own path is the operator's and may go through symbolic links (it is
resolved once per call); below the root, every component must be a real directory or, last,
a real file. No symbolic link is followed below a root, not even one that stays inside it:
a link is a path its owner can retarget at any moment, and following one safely would need
a resolver of its own in the fallback below. Datasets laid out with links inside a root are
refused with a message saying so; hard links or copies work, or the operator can name the
link's target folder as a root of its own. `..` is allowed while it stays beneath the root.

Where the kernel has openat2(2) (Linux 5.6 on), the kernel resolves the path under
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS from a descriptor of the root, which is race-free by
construction. Elsewhere the path is walked one component at a time, each opened with
O_NOFOLLOW relative to the descriptor of the one before, and the opened descriptor's real
path is checked against the root's.

Callers read what they opened (the descriptor, or `fd_path` of it, which names the same
open file, not the path), never the path again.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import stat
from collections.abc import Iterator, Sequence

from workers.errors import UserError

__all__ = ["OPENAT2", "OutsideRoots", "fd_path", "open_beneath", "opened", "walk_beneath"]

# openat2 has one number on every architecture with the generic syscall table, and on
# x86's own tables too; others (alpha, ia64, mips) use the fallback walk.
_OPENAT2_NR = {"x86_64": 437, "i686": 437, "aarch64": 437, "armv7l": 437, "riscv64": 437,
               "ppc64le": 437, "s390x": 437}  # fmt: skip
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW
# Reading never blocks on a FIFO nor makes a terminal ours; a file's reads ignore both.
_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
_PATH = getattr(os, "O_PATH", 0)  # Linux: a handle that needs no read permission


class OutsideRoots(UserError):
    """Raised when a path is not beneath any of the allowed roots, or reaches its file
    through a symbolic link below one."""


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64))  # fmt: skip


def _probe() -> bool:
    """Whether this kernel (and any seccomp filter in front of it) runs openat2."""
    if platform.system() != "Linux" or platform.machine() not in _OPENAT2_NR:
        return False
    try:
        fd = _openat2(os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), ".", _PATH)
    except OSError:
        return False
    os.close(fd)
    return True


def _openat2(dirfd: int, path: str, flags: int) -> int:
    """openat2(dirfd, path) beneath dirfd, following no link; closes dirfd."""
    how = _OpenHow(flags | _FLAGS, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS)
    try:
        for _ in range(8):  # EAGAIN: a rename raced a `..`; the kernel asks for a retry
            fd = _LIBC.syscall(
                ctypes.c_long(_OPENAT2_NR[platform.machine()]), ctypes.c_int(dirfd),
                ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                ctypes.c_size_t(ctypes.sizeof(how)),
            )  # fmt: skip
            if fd >= 0:
                return int(fd)
            err = ctypes.get_errno()
            if err != errno.EAGAIN:
                raise OSError(err, os.strerror(err), path)
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)
    finally:
        os.close(dirfd)


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.syscall.restype = ctypes.c_long
OPENAT2 = _probe()


def fd_path(fd: int) -> str:
    """A name for the open file `fd` (not for the path it was opened by): opening it opens
    that same file, even after the path was swapped."""
    return f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else f"/dev/fd/{fd}"


def _beneath(path: str, root: str) -> str | None:
    """`path` relative to `root` (as written or resolved), lexically; None if not under."""
    for spelling in dict.fromkeys(
        (os.path.normpath(os.path.abspath(root)), os.path.realpath(root))
    ):
        base = spelling.rstrip("/")
        if path in (spelling, base):
            return "."
        if path.startswith(base + "/"):
            return path[len(base) + 1 :] or "."
    return None


def _walk(rootfd: int, rel: str, flags: int) -> int:
    """The fallback: each component opened with O_NOFOLLOW relative to the folder before
    it, `..` going back to the descriptor held for the folder above (never above the
    root), so a link is refused wherever it stands, as openat2 refuses it."""
    parts = [part for part in rel.split("/") if part not in ("", ".")] or ["."]
    held = [os.dup(rootfd)]
    try:
        for part in parts[:-1]:
            if part == "..":
                _up(held)
                continue
            try:
                step = os.open(part, os.O_RDONLY | os.O_DIRECTORY | _FLAGS, dir_fd=held[-1])
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(part, held[-1]):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), part) from None
                raise
            held.append(step)
        last = parts[-1]
        if last == "..":
            _up(held)
            last = "."
        return os.open(last, flags | _FLAGS, dir_fd=held[-1])
    finally:
        for fd in held:
            os.close(fd)


def _up(held: list[int]) -> None:
    if len(held) == 1:
        raise OutsideRoots("goes above its root")
    os.close(held.pop())


def _is_link(name: str, dirfd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dirfd).st_mode)
    except OSError:
        return False


def _open_under(root: str, rel: str, flags: int) -> int:
    real = os.path.realpath(root)
    rootfd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if OPENAT2:
        return _openat2(rootfd, rel, flags)
    try:
        fd = _walk(rootfd, rel, flags)
    finally:
        os.close(rootfd)
    try:  # the descriptor's own path, as the kernel knows it
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        where = None
    if where is not None and where != real and not where.startswith(real.rstrip("/") + "/"):
        os.close(fd)
        raise OutsideRoots("resolves outside its root")
    return fd


def open_beneath(path: str, roots: Sequence[str] | None, flags: int = _READ) -> int:
    """A descriptor of `path` (absolute) opened beneath one of `roots` under the rule above;
    the caller closes it. `roots` None is a trusted caller: the path is opened as given,
    following links. Raises OutsideRoots, or OSError for a file that is missing or
    unreadable."""
    if roots is None:
        return os.open(path, flags | os.O_CLOEXEC)
    if "\0" in path:
        raise OutsideRoots("holds a NUL byte")
    refusal: OutsideRoots | None = None
    for root in roots:
        rel = _beneath(path, root)
        if rel is None:
            continue
        try:
            fd = _open_under(root, rel, flags)
        except OutsideRoots as exc:
            refusal = exc
            continue
        except OSError as exc:
            # O_DIRECTORY | O_NOFOLLOW on a link answers ENOTDIR; only the message differs.
            if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and os.path.islink(path)):
                refusal = OutsideRoots("goes through a symbolic link, which is not followed")
                continue
            if exc.errno == errno.EXDEV:
                refusal = OutsideRoots("goes above its root")
                continue
            raise
        if stat.S_ISLNK(os.fstat(fd).st_mode):  # O_PATH | O_NOFOLLOW opens a link itself
            os.close(fd)
            refusal = OutsideRoots("is a symbolic link, which is not followed")
            continue
        return fd
    raise refusal or OutsideRoots("is not inside the allowed roots")


def walk_beneath(
    folder: str, roots: Sequence[str]
) -> Iterator[tuple[str, list[str], list[str], int]]:
    """os.fwalk of `folder`, opened beneath `roots`, never following a link: a folder
    swapped for a link mid-walk is skipped (fwalk checks each opened folder is the one it
    listed). Yields (relative folder, dirs, files, folder fd) as os.fwalk does."""
    top = open_beneath(folder, roots, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for where, dirs, files, fd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            yield os.path.normpath(where), dirs, files, fd
    finally:
        os.close(top)


@contextlib.contextmanager
def opened(path: str, roots: Sequence[str] | None, flags: int = _READ) -> Iterator[int]:
    """`open_beneath` as a context manager that closes the descriptor."""
    fd = open_beneath(path, roots, flags)
    try:
        yield fd
    finally:
        os.close(fd)
