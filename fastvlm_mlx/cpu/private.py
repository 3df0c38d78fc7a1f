"""The one folder the CPU backend builds, caches and loads code in: ours alone, checked.

`machine_folder()` is `~/.cache/fastvlm-mlx/<machine>-<cpu key>` (XDG_CACHE_HOME is honoured),
mode 0700. It is used only when no other user can change anything on the way to it: every
folder from / down is owned by root or by us and is not writable by others unless sticky (as
/tmp is), and the folder itself is ours with no group or other access. Then nobody but root
can swap, plant or remove anything in it between a check and a load. Where the home folder
fails that test, `/tmp/fastvlm-mlx-<uid>` is tried (sticky /tmp: others cannot rename or
delete our entries); where that fails too, nothing is built or loaded. The CPU key (machine,
CPU model, CPU flags) keeps `-march=native` builds of different CPUs apart, so a home folder
shared between machines rebuilds instead of crashing with SIGILL. This module must not
import mlx (the BLAS preload uses it before mlx loads).
"""

import hashlib
import os
import platform
import stat
import tempfile

_FOLDER: list = []  # [path or None], once found
# /proc/cpuinfo fields that name a CPU and what it can run: x86 (model name, flags) and arm64
# (implementer, part, variant, revision, Features), which has neither of the first two.
_IDENTITY = ("model name", "flags", "CPU implementer", "CPU architecture", "CPU variant", "CPU part")
_IDENTITY += ("CPU revision", "Features")


def cpu_info(field: str) -> str | None:
    """The first `field` entry of /proc/cpuinfo ("flags", "model name"), or None (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":")[0].strip() == field), None)
    except OSError:
        return None


def cpu_key() -> str:
    """Names this machine's CPU: native builds for one must never be loaded on another."""
    identity = "\n".join([platform.machine(), platform.processor(), *(cpu_info(f) or "" for f in _IDENTITY)])
    return f"{platform.machine()}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def safe_path(path: str) -> bool:
    """True when no other (non-root) user can change what `path` names: it and every folder
    above it (symlinks resolved) are owned by root or us, and none is writable by group or
    others unless sticky."""
    uid = os.getuid()
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    for i in range(1, len(parts) + 1):
        current = os.sep.join(parts[:i]) or os.sep
        try:
            info = os.lstat(current)
        except OSError:
            return False
        if info.st_uid not in (0, uid) or not stat.S_ISDIR(info.st_mode):
            return False
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            return False
    return True


def existing_ancestor(path: str) -> str:
    """`path` or the nearest folder above it that exists."""
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _own_private_folder(path: str) -> str | None:
    """Make `path` (mode 0700) or reuse it if it is already ours and private; None otherwise.
    Nothing is made under a folder others could change; `path` must be absolute and resolved."""
    if not safe_path(existing_ancestor(path)):
        return None
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)  # a symlink planted there fails
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
    except (OSError, AttributeError):  # read-only home, no O_NOFOLLOW (Windows), ...
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    return path if safe_path(path) else None


def _candidates() -> list[str]:
    """Absolute, symlink-free roots to try (a relative one would move with the working folder,
    and a link could be re-pointed after our check)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    tmp = tempfile.gettempdir() if safe_path(tempfile.gettempdir()) else "/tmp"
    roots = [os.path.join(base, "fastvlm-mlx"), os.path.join(tmp, f"fastvlm-mlx-{os.getuid()}")]
    return [os.path.realpath(root) for root in roots if os.path.isabs(root)]


def machine_folder() -> str | None:
    """This user's private folder for this CPU (made on first use), or None where there is none."""
    if not _FOLDER:
        found = None
        if hasattr(os, "getuid"):
            for root in _candidates():
                if _own_private_folder(root) and (found := _own_private_folder(os.path.join(root, cpu_key()))):
                    break
        _FOLDER.append(found)
    return _FOLDER[0]


def subfolder(name: str) -> str | None:
    """A private folder inside `machine_folder()`, or None."""
    root = machine_folder()
    return _own_private_folder(os.path.join(root, name)) if root else None


def owned_file(path: str) -> bool:
    """A regular file of ours that nobody else can write (checked before it is loaded)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022
