"""Bad input as one-line errors: our exception type, and messages for the foreign ones we know.

`explain` is the one table of foreign error classes that mean bad input rather than a bug (the
OS, PIL, json, UTF-8, safetensors, transformers' config checks); the CLI shows them as one line.
Anything it does not know keeps its traceback, because then the bug is ours.
"""

import errno
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """Bad input that the user can fix; the message names the problem and the fix."""


OS_FIXES = {
    errno.ENOSPC: "free some space or choose a path on another disk",
    errno.EDQUOT: "free some space or choose a path on another disk",
    errno.EROFS: "choose a path on a writable disk",
    errno.EACCES: "choose a path you may use, or change its permissions",
    errno.EPERM: "choose a path you may use, or change its permissions",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; give a file path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "the path has a symbolic-link loop; choose another path",
    errno.EEXIST: "remove it or choose another path",
}


def explain(error: BaseException, path: str | Path | None = None) -> str | None:
    """One line naming the file and the fix for a known class of bad-input error, else None.

    `path` names the file being read or written when the error itself does not carry it."""
    from PIL import Image, UnidentifiedImageError

    where = f"{path}: " if path is not None else ""
    if isinstance(error, UnidentifiedImageError):
        return f"{where}{error}; give a PNG, JPEG or other PIL-readable image"
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"{where}{error}; PIL refuses images this large, give a smaller one"
    if isinstance(error, json.JSONDecodeError):
        return f"{where}not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); fix or re-create it"
    if isinstance(error, UnicodeDecodeError):
        return f"{where}not valid UTF-8 (byte {error.object[error.start]:#04x} at {error.start}); save it as UTF-8"
    safetensors, hub = sys.modules.get("safetensors"), sys.modules.get("huggingface_hub.errors")
    if safetensors and isinstance(error, safetensors.SafetensorError):
        return f"{where}damaged safetensors file ({error}); re-download the checkpoint or re-run `fastvlm-mlx convert`"
    if hub and isinstance(error, hub.StrictDataclassError):  # transformers' typed config fields
        return f"{where}{error}; fix that field of the checkpoint's config.json"
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list):
        _, target, why = error.args[0][0]  # copytree's (source, target, reason) per failed file
        return f"{where}{len(error.args[0])} file(s) could not be copied, the first to {target}: {why}"
    if isinstance(error, OSError) and error.errno in OS_FIXES:
        if path is None:  # the path the user gave beats the one the OS reports (a temporary, a parent)
            names = [str(name) for name in (error.filename, error.filename2) if name is not None]
            where = f"{' -> '.join(names)}: " if names else ""
        return f"{where}{error.strerror}; {OS_FIXES[error.errno]}"
    return None


def check_writable(folder: Path, option: str) -> None:
    """A UserError unless files can be made in `folder` (made if missing): its nearest existing
    ancestor must be a folder this user may write and enter (a read-only mount stops root too)."""
    folder = Path(os.path.abspath(folder))
    existing = next(p for p in (folder, *folder.parents) if os.path.lexists(p))
    if not existing.is_dir():
        kind = "a file" if existing.is_file() else "not a folder"
        raise UserError(f"{existing} is {kind}, so nothing can be written in {folder}; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{existing} is not writable (a read-only disk or not yours); choose another {option}")


@contextmanager
def naming(path: str | Path):
    """Errors that `explain` knows, raised inside, become UserErrors that name `path`."""
    try:
        yield
    except Exception as error:
        message = None if isinstance(error, UserError) else explain(error, path)
        if message is None:
            raise
        raise UserError(message) from error
