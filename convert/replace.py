"""Publish a finished output folder at OUT without ever losing what was there.

The output is built in a private stage folder beside OUT (`.OUT.<random>.fastvlm-stage`, mode
0700, with our marker file inside), then published by one rename (`fastvlm_mlx.files`):
- without force, a no-replace rename: whatever appeared at OUT meanwhile is kept and the publish fails;
- with force, an atomic swap (`RENAME_EXCHANGE` / `RENAME_SWAP`); where there is none, OUT is
  first moved into the stage folder (stage/old), then the new output renamed onto the free name.
  The old OUT is deleted only once the new output is confirmed at OUT (same inode as recorded
  before the renames); otherwise it goes back to OUT, or, if something else holds OUT now, the
  stage is kept and the message says where the old OUT is. A symlink at OUT is replaced as a
  link: its target is never followed, moved or deleted.
Stages left by a killed run are finished or undone by the next run for the same OUT, only when
the folder is a real directory of ours (our uid, mode 0700), our marker is in it and the process
that wrote it is gone. Stages are opened with O_NOFOLLOW and emptied through their file
descriptor, so a folder swapped for a symlink meanwhile is never followed. No other name beside
OUT is ever touched.
"""

import json
import os
import secrets
import shutil
import socket
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from fastvlm_mlx.errors import UserError, check_writable, explain
from fastvlm_mlx.files import NOFOLLOW, exchange, rename_no_replace

MARKER = ".fastvlm-stage.json"
PUBLISHING = "publishing.json"  # the new output's {dev, ino}, written just before the renames
STAGE_SUFFIX = ".fastvlm-stage"
NEW, OLD = "new", "old"  # stage/new/<OUT name>: the output; stage/old/<OUT name>: OUT moved aside
STAGE_MODE = 0o700
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW


def check_apart(src: Path, out: Path, inside_ok: bool = False) -> None:
    """Refuse an OUT that is SRC, contains SRC, or (unless inside_ok) lies inside SRC, symlinks resolved."""
    real_src, real_out = _resolve(src, "SRC"), _resolve(out, "OUT")
    if _same(real_src, real_out):
        raise UserError(f"OUT {out} is SRC {src}; writing it would destroy the checkpoint: choose another OUT")
    if any(_same(parent, real_out) for parent in real_src.parents):
        raise UserError(f"OUT {out} contains SRC {src}; replacing it would delete the checkpoint: choose another OUT")
    if not inside_ok and any(_same(parent, real_src) for parent in real_out.parents):
        raise UserError(f"OUT {out} lies inside SRC {src}; write it outside the checkpoint, e.g. {real_src}-mlx")


def _resolve(path: Path, role: str) -> Path:
    try:
        return Path(path).resolve()
    except RuntimeError:  # Python 3.11's "Symlink loop from ..."
        raise UserError(
            f"{role} {path}: the path has a symbolic-link loop; remove the link or choose another {role}"
        ) from None
    except OSError as error:  # ELOOP on newer Pythons, or a part of the path we may not read
        raise UserError(f"{role} {explain(error, path) or _describe(error)}") from None


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
    check_writable(out.parent, "OUT")
    recover(out)
    if os.path.lexists(out) and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    return out


def recover(out: str | Path) -> None:
    """Undo or finish what killed runs left for OUT: stages of ours that hold our marker and whose writer is gone."""
    out = Path(os.path.abspath(out))
    try:
        parent_fd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # no parent folder yet, or one we cannot open: nothing of ours is there
    try:
        prefix = _stage_prefix(out)
        for name in os.listdir(parent_fd):
            if not (name.startswith(prefix) and name.endswith(STAGE_SUFFIX)):
                continue
            stage_fd = _open_stage(name, parent_fd)
            if stage_fd is None:
                continue
            try:
                marker = read_marker(stage_fd, name, out)
            finally:
                os.close(stage_fd)
            if marker is not None and writer_gone(marker):
                kept = _remove_stage(parent_fd, name, out, interrupted=True)
                if kept is not None:
                    warnings.warn(f"{out} holds something else; the {out.name} you had is at {kept}", stacklevel=2)
    finally:
        os.close(parent_fd)


@contextmanager
def staged(out: str | Path, force: bool) -> Iterator[Path]:
    """Yield the path to create the new OUT at (a folder to make); publish it there when the block ends.

    On any error OUT is as it was (or, if something else took OUT while a forced replace ran, the
    old OUT is kept in the stage and the error says where); OSErrors become UserErrors."""
    out = Path(os.path.abspath(out))
    parent_fd, name = _make_stage(out)
    appeared, kept = False, None
    try:
        try:
            yield out.parent / name / NEW / out.name
        except OSError as error:
            raise UserError(f"cannot write {out}: {_describe(error)}") from None
        try:
            _publish(parent_fd, name, out.name, force)
        except FileExistsError:
            appeared = True
        except OSError as error:
            raise UserError(f"cannot put the new {out} in place: {error.strerror or error}") from None
    finally:
        kept = _remove_stage(parent_fd, name, out)
        os.close(parent_fd)
    if appeared:
        raise UserError(_appeared(out, force, kept))
    if kept is not None:
        warnings.warn(f"{out} was replaced meanwhile; the {out.name} you had is kept at {kept}", stacklevel=3)


def _appeared(out: Path, force: bool, kept: Path | None) -> str:
    if not force:
        return f"{out} appeared while this ran and was left as it is; pass --force to replace it or choose another OUT"
    if kept is not None:
        return (
            f"{out} appeared while this ran, after the {out.name} you had was moved aside; it was left as it is "
            f"and this run's output not published; the {out.name} you had is kept at {kept}"
        )
    return f"{out} appeared again while this ran and was left as it is; run again to replace it"


def _publish(parent_fd: int, stage: str, name: str, force: bool) -> None:
    fds = [_open_dir(stage, parent_fd)]
    try:
        fds += [_open_dir(NEW, fds[0]), _open_dir(OLD, fds[0])]
        stage_fd, new_fd, old_fd = fds
        new = _lstat(name, new_fd)
        if new is None:
            raise RuntimeError(f"nothing was written at {stage}/{NEW}/{name}")  # a caller bug, not bad input
        _write_private(stage_fd, PUBLISHING, json.dumps({"dev": new.st_dev, "ino": new.st_ino}))
        if force and _lstat(name, parent_fd) is not None:
            try:
                if exchange(name, name, a_dir_fd=new_fd, b_dir_fd=parent_fd):
                    return  # the old OUT is now at stage/new, deleted with the stage
                os.rename(name, name, src_dir_fd=parent_fd, dst_dir_fd=old_fd)  # kept until the new one is at OUT
            except FileNotFoundError:
                pass  # OUT went away meanwhile
        rename_no_replace(name, name, src_dir_fd=new_fd, dst_dir_fd=parent_fd)
    finally:
        for fd in fds:
            os.close(fd)


def _stage_prefix(out: Path) -> str:
    return f".{out.name[:50]}."  # the whole name stays within 255 bytes, even in 4-byte characters


def _make_stage(out: Path) -> tuple[int, str]:
    """(fd of OUT's folder, name of a new stage folder in it holding our marker, new/ and old/)."""
    token = secrets.token_hex(8)
    name = f"{_stage_prefix(out)}{token}{STAGE_SUFFIX}"
    marker = dict(tool="fastvlm-mlx", target=out.name, token=token, **_identity(os.getpid()))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        parent_fd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise UserError(f"cannot write beside {out} in {out.parent}: {_describe(error)}") from None
    try:
        os.mkdir(name, STAGE_MODE, dir_fd=parent_fd)
        stage_fd = _open_dir(name, parent_fd)
        try:
            os.fchmod(stage_fd, STAGE_MODE)  # whatever the umask: the mode is part of what marks it ours
            _write_private(stage_fd, MARKER, json.dumps(marker))
            os.mkdir(NEW, dir_fd=stage_fd)
            os.mkdir(OLD, dir_fd=stage_fd)
        finally:
            os.close(stage_fd)
    except OSError as error:
        _remove_stage(parent_fd, name, out, quiet=True)
        os.close(parent_fd)
        raise UserError(f"cannot write beside {out} in {out.parent}: {_describe(error)}") from None
    return parent_fd, name


def _write_private(dir_fd: int, name: str, text: str) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600, dir_fd=dir_fd)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _open_dir(name: str, dir_fd: int) -> int:
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def _open_stage(name: str, parent_fd: int) -> int | None:
    """An fd on the folder `name` if it is a stage we made (a real directory, our uid, mode 0700), else None.

    Checked on the open descriptor, so nothing can be swapped in between the check and the use."""
    try:
        fd = _open_dir(name, parent_fd)  # a symlink (ELOOP) or a file (ENOTDIR) is not ours
    except OSError:
        return None
    info = os.fstat(fd)
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) != STAGE_MODE:
        os.close(fd)
        return None
    return fd


def _json_at(stage_fd: int, name: str) -> tuple[object, int | None]:
    """(JSON content, mtime in ns) of a small regular file `name` in the open stage folder, never
    following a link; (None, None) when there is no such readable file."""
    try:
        fd = os.open(name, os.O_RDONLY | NOFOLLOW, dir_fd=stage_fd)
    except OSError:
        return None, None
    try:
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            return (json.loads(f.read(4096)), info.st_mtime_ns) if stat.S_ISREG(info.st_mode) else (None, None)
    except (OSError, ValueError):
        return None, None


def read_marker(stage_fd: int, stage_name: str, out: Path) -> dict | None:
    """The marker's contents if the open stage folder is one we wrote for `out`, else None."""
    data, _ = _json_at(stage_fd, MARKER)
    if not isinstance(data, dict) or data.get("tool") != "fastvlm-mlx" or data.get("target") != out.name:
        return None
    token = data.get("token")
    return data if isinstance(token, str) and stage_name == f"{_stage_prefix(out)}{token}{STAGE_SUFFIX}" else None


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


def _remove_stage(parent_fd: int, name: str, out: Path, interrupted: bool = False, quiet: bool = False) -> Path | None:
    """Settle the OUT an interrupted swap moved aside, then delete the stage, marker last.

    Returns where the old OUT is kept when it can neither go (the new output is not confirmed at
    OUT) nor go back (something else is at OUT); the stage then stays with it inside."""
    stage_fd = _open_stage(name, parent_fd)
    if stage_fd is None:
        return None  # gone, or not ours: never touched
    try:
        kept = _settle_old(stage_fd, parent_fd, out.name, interrupted)
        for child in os.listdir(stage_fd):
            if child != MARKER and not (kept and child == OLD):
                _delete(child, stage_fd)
        if kept:
            return out.parent / name / OLD / out.name
        os.unlink(MARKER, dir_fd=stage_fd)
        if os.path.samestat(os.stat(name, dir_fd=parent_fd, follow_symlinks=False), os.fstat(stage_fd)):
            os.rmdir(name, dir_fd=parent_fd)
    except FileNotFoundError:
        pass  # another run is deleting it too
    except OSError as error:
        if not quiet:
            warnings.warn(f"could not delete {out.parent / name}: {_describe(error)}; delete it by hand", stacklevel=2)
    finally:
        os.close(stage_fd)
    return None


def _settle_old(stage_fd: int, parent_fd: int, name: str, interrupted: bool) -> bool:
    """Let stage/old/<name> go if the new output is at OUT, else put it back; True if it must be kept."""
    record, at_out = _read_record(stage_fd), _lstat(name, parent_fd)
    published = at_out is not None and record is not None and record[:2] == (at_out.st_dev, at_out.st_ino)
    if interrupted and not published and at_out is not None and _placeholder(at_out, record):
        with suppress(OSError):  # fails if it is not empty (any more): then it is not ours to remove
            os.rmdir(name, dir_fd=parent_fd)
            at_out = None
    try:
        old_fd = _open_dir(OLD, stage_fd)
    except FileNotFoundError:
        return False
    try:
        if published or _lstat(name, old_fd) is None:
            return False
        if at_out is None:
            with suppress(FileExistsError):  # something took OUT this instant: keep the old one
                rename_no_replace(name, name, src_dir_fd=old_fd, dst_dir_fd=parent_fd)
                return False
        return True
    finally:
        os.close(old_fd)


def _placeholder(at_out: os.stat_result, record: tuple | None) -> bool:
    """Whether OUT may be the empty folder a no-replace rename without renameat2 makes before its
    rename (`fastvlm_mlx.files.rename_no_replace`): a folder of ours made after the renames began."""
    return (
        record is not None
        and stat.S_ISDIR(at_out.st_mode)
        and at_out.st_uid == os.getuid()
        and at_out.st_mtime_ns >= record[2]
    )


def _read_record(stage_fd: int) -> tuple[int, int, int] | None:
    """(dev, ino) of the new output as recorded before the renames, and when the record was made."""
    data, made = _json_at(stage_fd, PUBLISHING)
    dev, ino = (data.get(key) if isinstance(data, dict) else None for key in ("dev", "ino"))
    return (dev, ino, made) if isinstance(dev, int) and isinstance(ino, int) else None


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _delete(name: str, dir_fd: int) -> None:
    info = _lstat(name, dir_fd)
    if info is not None and stat.S_ISDIR(info.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)  # through descriptors: never follows a symlink, even one swapped in
    elif info is not None:
        os.unlink(name, dir_fd=dir_fd)


def _describe(error: OSError) -> str:
    names = [str(name) for name in (error.filename, error.filename2) if name is not None]
    return f"{error.strerror or error}" + (f" ({' -> '.join(names)})" if names else "")
