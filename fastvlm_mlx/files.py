"""Files the user names, read and written without surprises.

- `rename_no_replace` never replaces what is at the target, even a file or folder that appears
  there a moment before (`renameat2(RENAME_NOREPLACE)` on Linux, `renameatx_np(RENAME_EXCL)` on
  macOS; elsewhere a hard link for files, `mkdir` then a rename onto that empty folder for folders);
- `create_new` makes a file that did not exist, never following a link planted at its name;
- `read_bounded` reads a file or stdin up to a limit, so `/dev/zero` is an error, not a hang.
"""

import ctypes
import errno
import os
import secrets
import stat
import sys
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

from fastvlm_mlx.errors import UserError

UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
TEXT_LIMIT = 16 * 2**20  # bytes of a prompt file: far above any context (32k tokens are about 150 kB)


def _native_rename():
    """(rename(src_dir_fd, src, dst_dir_fd, dst, flag), {"noreplace": flag, "exchange": flag}, AT_FDCWD)
    from libc, or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fd, path, flags = ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        libc.renameat2.argtypes = (fd, path, fd, path, flags)
        return libc.renameat2, {"noreplace": 1, "exchange": 2}, -100
    if sys.platform == "darwin" and hasattr(libc, "renameatx_np"):
        libc.renameatx_np.argtypes = (fd, path, fd, path, flags)
        return libc.renameatx_np, {"noreplace": 4, "exchange": 2}, -2
    return None


NATIVE = _native_rename()


def _flagged_rename(src, dst, mode: str, src_dir_fd: int | None, dst_dir_fd: int | None) -> bool:
    """True once done, False where this system or file system lacks the flag; OSError otherwise."""
    if NATIVE is None:
        return False
    rename, flags, cwd = NATIVE
    src_fd, dst_fd = (cwd if fd is None else fd for fd in (src_dir_fd, dst_dir_fd))
    if rename(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), flags[mode]) == 0:
        return True
    code = ctypes.get_errno()
    if code in UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def rename_no_replace(src, dst, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
    """Rename src to dst (each relative to its folder's fd if given); FileExistsError, with src
    untouched, if anything (even a dangling link) is at dst."""
    if _flagged_rename(src, dst, "noreplace", src_dir_fd, dst_dir_fd):
        return
    if not _is_real_dir(src, src_dir_fd):
        os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)  # fails if dst exists
        os.unlink(src, dir_fd=src_dir_fd)
        return
    os.mkdir(dst, dir_fd=dst_dir_fd)  # fails if dst exists; a rename then replaces only this empty folder of ours
    try:
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
    except BaseException:
        with suppress(OSError):
            os.rmdir(dst, dir_fd=dst_dir_fd)  # only while it is still empty
        raise


def _is_real_dir(path, dir_fd: int | None) -> bool:
    return stat.S_ISDIR(os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode)


def exchange(a, b, *, a_dir_fd: int | None = None, b_dir_fd: int | None = None) -> bool:
    """Swap two existing paths atomically; False where the system cannot."""
    return _flagged_rename(a, b, "exchange", a_dir_fd, b_dir_fd)


def create_new(folder: Path, prefix: str, suffix: str = "") -> tuple[int, Path]:
    """(fd open for writing, path) of a new file `folder/<prefix><random><suffix>`, made with
    O_EXCL|O_NOFOLLOW (a planted file or link at the name is never written through) and the
    usual permissions (0666 less the umask)."""
    while True:
        path = Path(folder) / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            return open_new(path), path
        except FileExistsError:
            continue


def open_new(path: Path) -> int:
    """An fd for writing a file at `path` that did not exist; FileExistsError if anything is there."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o666)


def read_bounded(source: str | Path | BinaryIO, limit: int = TEXT_LIMIT, name: str | None = None) -> bytes:
    """The bytes of a file path or an open binary stream (stdin), a UserError past `limit` bytes."""
    name = name or str(source)
    if isinstance(source, str | Path):
        with open(source, "rb") as stream:
            return read_bounded(stream, limit, name)
    data = source.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{name}: more than {limit // 2**20} MiB, far beyond any model's context; give a shorter text")
    return data
