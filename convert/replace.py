"""Publish a finished output folder at OUT without ever losing what was there.

The output is built in a private stage folder beside OUT (`.OUT.<random>.fastvlm-stage`, with
our marker file inside), then published by one rename:
- without force, a no-replace rename (`renameat2(RENAME_NOREPLACE)` on Linux,
  `renamex_np(RENAME_EXCL)` on macOS; elsewhere `mkdir(OUT)` then a rename onto that empty
  folder): whatever appeared at OUT meanwhile is kept and the publish fails;
- with force, an atomic swap (`RENAME_EXCHANGE` / `RENAME_SWAP`); where there is none, OUT is
  first moved into the stage folder, so a crash between the two renames leaves it there and the
  next run for OUT puts it back. A symlink at OUT is replaced as a link: its target is never
  followed, moved or deleted.
Stages left by a killed run are deleted by the next run for the same OUT, only when our marker
is in them and the process that wrote it is gone. No other name beside OUT is ever touched.
"""

import ctypes
import errno
import json
import os
import secrets
import shutil
import socket
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from fastvlm_mlx.errors import UserError

MARKER = ".fastvlm-stage.json"
STAGE_SUFFIX = ".fastvlm-stage"
NEW, OLD = "new", "old"  # stage/new/<OUT name>: the output; stage/old/<OUT name>: OUT moved aside
UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


def _native_rename():
    """(rename with flags, {"noreplace": flag, "exchange": flag}) from libc, or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    path, flags = ctypes.c_char_p, ctypes.c_uint
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        libc.renameat2.argtypes = (ctypes.c_int, path, ctypes.c_int, path, flags)
        at_fdcwd = -100
        return lambda a, b, flag: libc.renameat2(at_fdcwd, a, at_fdcwd, b, flag), {"noreplace": 1, "exchange": 2}
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        libc.renamex_np.argtypes = (path, path, flags)
        return libc.renamex_np, {"noreplace": 4, "exchange": 2}
    return None


NATIVE = _native_rename()


def _flagged_rename(src: Path, dst: Path, mode: str) -> bool:
    """True once done, False where this system or file system lacks the flag; OSError otherwise."""
    if NATIVE is None:
        return False
    rename, flags = NATIVE
    if rename(os.fsencode(src), os.fsencode(dst), flags[mode]) == 0:
        return True
    code = ctypes.get_errno()
    if code in UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename src to dst; FileExistsError, with src untouched, if anything (even a dangling link) is at dst."""
    if _flagged_rename(src, dst, "noreplace"):
        return
    if not os.path.isdir(src) or os.path.islink(src):
        os.link(src, dst, follow_symlinks=False)  # fails if dst exists
        os.unlink(src)
        return
    os.mkdir(dst)  # fails if dst exists; a rename then replaces only this empty folder of ours
    try:
        os.rename(src, dst)
    except BaseException:
        with suppress(OSError):
            os.rmdir(dst)  # only while it is still empty
        raise


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system cannot."""
    return _flagged_rename(a, b, "exchange")


def check_apart(src: Path, out: Path, inside_ok: bool = False) -> None:
    """Refuse an OUT that is SRC, contains SRC, or (unless inside_ok) lies inside SRC, symlinks resolved."""
    real_src, real_out = Path(src).resolve(), Path(out).resolve()
    if _same(real_src, real_out):
        raise UserError(f"OUT {out} is SRC {src}; writing it would destroy the checkpoint: choose another OUT")
    if any(_same(parent, real_out) for parent in real_src.parents):
        raise UserError(f"OUT {out} contains SRC {src}; replacing it would delete the checkpoint: choose another OUT")
    if not inside_ok and any(_same(parent, real_src) for parent in real_out.parents):
        raise UserError(f"OUT {out} lies inside SRC {src}; write it outside the checkpoint, e.g. {real_src}-mlx")


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)  # case-insensitive file systems, bind mounts
    except OSError:
        return False


def check_output(out: str | Path, force: bool, src: str | Path | None = None, inside_src_ok: bool = False) -> Path:
    """Checks before the work starts: OUT apart from SRC, an interrupted swap undone, OUT free unless force."""
    out = Path(os.path.abspath(out))
    if src is not None:
        check_apart(Path(src), out, inside_src_ok)
    existing = next(p for p in out.parents if os.path.lexists(p))
    if not existing.is_dir():
        raise UserError(f"cannot write {out}: {existing} is not a folder; choose another OUT")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {out}: {existing} is not writable for you; choose another OUT")
    recover(out)
    if os.path.lexists(out) and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    return out


def recover(out: str | Path) -> None:
    """Undo or finish what killed runs left for OUT: stages that hold our marker and whose writer is gone."""
    out = Path(os.path.abspath(out))
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return  # no parent folder yet, or one we cannot list: nothing of ours is there
    prefix = _stage_prefix(out)
    for entry in entries:
        if entry.name.startswith(prefix) and entry.name.endswith(STAGE_SUFFIX):
            marker = read_marker(entry, out)
            if marker is not None and writer_gone(marker):
                _remove_stage(entry, out)


@contextmanager
def staged(out: str | Path, force: bool) -> Iterator[Path]:
    """Yield the path to create the new OUT at (a folder to make); publish it there when the block ends.

    On any error OUT is as it was and the stage folder is gone; OSErrors become UserErrors."""
    out = Path(os.path.abspath(out))
    stage = _make_stage(out)
    try:
        try:
            yield stage / NEW / out.name
        except OSError as error:
            raise UserError(f"cannot write {out}: {_describe(error)}") from None
        try:
            _publish(stage, out, force)
        except OSError as error:
            raise UserError(f"cannot put the new {out} in place: {_describe(error)}") from None
    finally:
        _remove_stage(stage, out)


def _publish(stage: Path, out: Path, force: bool) -> None:
    new = stage / NEW / out.name
    if not os.path.lexists(new):
        raise RuntimeError(f"nothing was written at {new}")  # a caller bug, not bad input
    if force and os.path.lexists(out):
        try:
            if exchange(new, out):
                return  # the old OUT is now at `new`, deleted with the stage
            os.rename(out, stage / OLD / out.name)  # a crash from here on: the next run puts it back
        except FileNotFoundError:
            pass  # OUT went away meanwhile
    try:
        rename_no_replace(new, out)
    except FileExistsError:
        raise UserError(
            f"{out} appeared while this ran and was left as it is; pass --force to replace it or choose another OUT"
        ) from None


def _stage_prefix(out: Path) -> str:
    return f".{out.name[:50]}."  # the whole name stays within 255 bytes, even in 4-byte characters


def _make_stage(out: Path) -> Path:
    token = secrets.token_hex(8)
    stage = out.parent / f"{_stage_prefix(out)}{token}{STAGE_SUFFIX}"
    marker = dict(tool="fastvlm-mlx", target=out.name, token=token, **_identity(os.getpid()))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir(mode=0o700)
    except OSError as error:
        raise UserError(f"cannot write beside {out} in {out.parent}: {_describe(error)}") from None
    try:
        (stage / MARKER).write_text(json.dumps(marker))
        (stage / NEW).mkdir()
        (stage / OLD).mkdir()
    except OSError as error:
        _remove_stage(stage, out, marked=False)
        raise UserError(f"cannot write beside {out} in {out.parent}: {_describe(error)}") from None
    return stage


def read_marker(stage: Path, out: Path) -> dict | None:
    """The marker's contents if `stage` is a stage folder we wrote for `out`, else None."""
    marker = stage / MARKER
    try:
        if stage.is_symlink() or marker.is_symlink() or not marker.is_file():
            return None
        data = json.loads(marker.read_text())
    except (OSError, ValueError):  # another user's private stage, a foreign file
        return None
    if not isinstance(data, dict) or data.get("tool") != "fastvlm-mlx" or data.get("target") != out.name:
        return None
    token = data.get("token")
    return data if isinstance(token, str) and stage.name == f"{_stage_prefix(out)}{token}{STAGE_SUFFIX}" else None


def _identity(pid: int) -> dict:
    return dict(host=socket.gethostname(), boot=_boot_id(), pid=pid, started=_process_start(pid))


def writer_gone(marker: dict) -> bool:
    """Whether the process that wrote `marker` has certainly exited (unknown counts as alive)."""
    if os.name == "nt" or marker.get("host") != socket.gethostname():
        return False  # Windows' os.kill would end the process; another machine's stage, on a shared disk
    if marker.get("boot") != _boot_id():
        return True
    pid = marker.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    started = _process_start(pid)
    return marker.get("started") is not None and started is not None and started != marker["started"]


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """Linux: when the process started, in clock ticks since boot; pids are reused, this pair is not."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _remove_stage(stage: Path, out: Path, marked: bool = True) -> None:
    """Put back an OUT that an interrupted swap moved aside, then delete the stage, marker last."""
    old = stage / OLD / out.name
    try:
        if os.path.lexists(old) and not os.path.lexists(out):
            with suppress(FileExistsError, FileNotFoundError):  # another run got there first
                rename_no_replace(old, out)
        for child in stage.iterdir():
            if child.name != MARKER:
                _delete(child)
        (stage / MARKER).unlink(missing_ok=True)
        stage.rmdir()
    except FileNotFoundError:
        pass  # another run is deleting it too
    except OSError as error:
        if marked:
            warnings.warn(f"could not delete {stage}: {_describe(error)}; delete it by hand", stacklevel=2)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)  # never follows symlinks inside
    else:
        path.unlink(missing_ok=True)


def _describe(error: OSError) -> str:
    names = [str(name) for name in (error.filename, error.filename2) if name is not None]
    return f"{error.strerror or error}" + (f" ({' -> '.join(names)})" if names else "")
