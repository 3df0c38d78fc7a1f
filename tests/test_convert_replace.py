"""Publishing OUT (`convert.replace`): nothing the user had is ever lost, whatever happens meanwhile.

Each race is tested on the atomic primitive itself and on a real run, with the platform's
flagged rename and with the portable fallback (`NATIVE = None`).
"""

import errno
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from convert import replace
from convert.convert import convert
from fastvlm_mlx import files
from fastvlm_mlx.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
HAS_NATIVE = files.NATIVE is not None


@pytest.fixture(params=["native", "fallback"])
def rename_kind(request, monkeypatch):
    if request.param == "native" and not HAS_NATIVE:
        pytest.skip("no renameat2/renamex_np here")
    if request.param == "fallback":
        monkeypatch.setattr(files, "NATIVE", None)
    return request.param


def folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "version").write_text(text)
    return path


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def run_python(code: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, **popen)


def test_rename_no_replace_never_replaces(rename_kind, tmp_path):
    new = folder(tmp_path / "new", "new")
    for existing in ("dir", "file", "empty_dir", "dangling_link"):
        out = tmp_path / existing
        if existing == "dir":
            folder(out, "mine")
        elif existing == "file":
            out.write_text("mine")
        elif existing == "empty_dir":
            out.mkdir()
        else:
            out.symlink_to(tmp_path / "nowhere")
        with pytest.raises(FileExistsError):
            files.rename_no_replace(new, out)
        assert (new / "version").read_text() == "new"
    assert (tmp_path / "dir" / "version").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
    assert (tmp_path / "empty_dir").is_dir() and (tmp_path / "dangling_link").is_symlink()
    files.rename_no_replace(new, tmp_path / "free")
    assert (tmp_path / "free" / "version").read_text() == "new" and not new.exists()


def test_concurrent_no_replace_renames_one_wins(rename_kind, tmp_path):
    sources = [folder(tmp_path / f"src{i}", str(i)) for i in range(8)]
    out, barrier, results = tmp_path / "out", threading.Barrier(8), {}

    def publish(i):
        barrier.wait()
        try:
            files.rename_no_replace(sources[i], out)
            results[i] = "won"
        except FileExistsError:
            results[i] = "lost"

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in results.items() if r == "won"]
    assert len(winners) == 1 and len(results) == 8
    assert (out / "version").read_text() == str(winners[0])
    assert all((sources[i] / "version").read_text() == str(i) for i in results if i != winners[0])


@pytest.mark.skipif(not HAS_NATIVE, reason="no renameat2/renamex_np here")
def test_exchange_swaps_atomically(tmp_path):
    a, b = folder(tmp_path / "a", "a"), tmp_path / "b"
    b.write_text("b")
    assert files.exchange(a, b)
    assert (b / "version").read_text() == "a" and a.read_text() == "b"


def test_two_staged_writers_exactly_one_publishes(rename_kind, tmp_path):
    out, barrier, errors = tmp_path / "out", threading.Barrier(2), []

    def write(i):
        try:
            with replace.staged(out, force=False) as new:
                folder(new, str(i))
                barrier.wait()  # both have written before either publishes
        except UserError as error:
            errors.append(str(error))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and "appeared while this ran" in errors[0]
    assert (out / "version").read_text() in ("0", "1")
    assert hidden(tmp_path) == []


def test_output_that_appears_during_convert_is_kept(rename_kind, tiny_hf, tmp_path, monkeypatch):
    """Another process creates OUT between the build and the publish: convert fails, OUT stays."""
    import convert.convert as conversion

    out, write_model = tmp_path / "out", conversion.write_model

    def write_then_race(*args):
        write_model(*args)
        folder(out, "someone else's")

    monkeypatch.setattr(conversion, "write_model", write_then_race)
    with pytest.raises(UserError, match="appeared while this ran"):
        convert(tiny_hf[0], out)
    assert (out / "version").read_text() == "someone else's" and not (out / "model.safetensors").exists()
    assert hidden(tmp_path) == []


def test_force_replaces_and_keeps_look_alike_names(rename_kind, tiny_hf, tmp_path):
    out = folder(tmp_path / "out", "old")
    (tmp_path / ".out.old").write_text("the user's own file")
    look_alike = folder(tmp_path / ".out.0123456789abcdef.fastvlm-stage", "the user's own folder")
    convert(tiny_hf[0], out, force=True)
    assert (out / "model.safetensors").is_file() and not (out / "version").exists()
    assert (tmp_path / ".out.old").read_text() == "the user's own file"
    assert (look_alike / "version").read_text() == "the user's own folder"
    assert hidden(tmp_path) == [".out.0123456789abcdef.fastvlm-stage", ".out.old"]


def test_force_onto_a_symlink_replaces_the_link_not_its_target(rename_kind, tiny_hf, tmp_path):
    target = folder(tmp_path / "target", "the link's target")
    out = tmp_path / "out"
    out.symlink_to(target, target_is_directory=True)
    with pytest.raises(UserError, match="already exists"):
        convert(tiny_hf[0], out)
    convert(tiny_hf[0], out, force=True)
    assert not out.is_symlink() and (out / "model.safetensors").is_file()
    assert (target / "version").read_text() == "the link's target" and sorted(os.listdir(target)) == ["version"]


@pytest.mark.parametrize("relation", ["same", "out_inside_src", "src_inside_out", "link_to_src"])
def test_out_overlapping_src_is_refused_even_with_force(tiny_hf, tmp_path, relation):
    parent = tmp_path / "parent"
    src = parent / "ckpt"
    src.mkdir(parents=True)
    for f in tiny_hf[0].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    if relation == "link_to_src":
        (tmp_path / "link").symlink_to(src, target_is_directory=True)
    out = {"same": src, "out_inside_src": src / "mlx", "src_inside_out": parent, "link_to_src": tmp_path / "link"}
    with pytest.raises(UserError, match="SRC") as error:
        convert(src, out[relation], force=True)
    assert str(out[relation]) in str(error.value) and str(src) in str(error.value)
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
    assert hidden(parent) == [] and hidden(src) == []


def test_out_is_src_is_one_line_on_the_cli(tiny_hf, tmp_path):
    from tests.test_cli import assert_clean_error, run_cli

    assert_clean_error(run_cli("convert", str(tiny_hf[0]), str(tiny_hf[0]), "--force"), "is SRC")


CRASH = """
import os, sys
from pathlib import Path
from convert import replace
from fastvlm_mlx import files
out, when = Path(sys.argv[1]), sys.argv[2]
if when == "between_renames":
    files.NATIVE = None  # no atomic swap here: OUT is moved into the stage first
    replace.rename_no_replace = lambda *args, **kwargs: os._exit(9)
else:
    replace._remove_stage = lambda *args, **kwargs: os._exit(9)
with replace.staged(out, force=True) as new:
    new.mkdir()
    (new / "version").write_text("new")
"""


@pytest.mark.parametrize("when", ["between_renames", "after_swap"])
def test_crashed_force_is_recovered_by_the_next_run(tmp_path, when):
    out = folder(tmp_path / "out", "old")
    (tmp_path / ".out.old").write_text("the user's own file")
    assert run_python(CRASH, str(out), when).wait() == 9
    assert len(hidden(tmp_path)) == 2  # our stage is still there
    if when == "between_renames":
        assert not out.exists()  # the crash hit between the renames
    with pytest.raises(UserError, match="already exists"):
        replace.check_output(out, force=False)  # the next run puts OUT back first, then sees it
    assert (out / "version").read_text() == ("old" if when == "between_renames" else "new")
    assert hidden(tmp_path) == [".out.old"] and (tmp_path / ".out.old").read_text() == "the user's own file"


def test_crashed_force_then_forced_rerun_finishes(tiny_hf, tmp_path):
    out = folder(tmp_path / "out", "old")
    assert run_python(CRASH, str(out), "between_renames").wait() == 9
    convert(tiny_hf[0], out, force=True)
    assert (out / "model.safetensors").is_file() and hidden(tmp_path) == []


HOLD = """
import sys
from pathlib import Path
from convert import replace
with replace.staged(Path(sys.argv[1]), force=False) as new:
    new.mkdir()
    print("staged", flush=True)
    sys.stdin.read()
"""


def test_stale_stage_of_a_killed_run_is_cleaned_live_ones_and_look_alikes_kept(tmp_path):
    out = tmp_path / "out"
    unmarked = folder(tmp_path / ".out.0123456789abcdef.fastvlm-stage", "user")
    other = folder(tmp_path / ".other.0123456789abcdef.fastvlm-stage", "user")
    holder = run_python(HOLD, str(out), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "staged"
        ours = [n for n in hidden(tmp_path) if n not in (unmarked.name, other.name)]
        assert len(ours) == 1
        forged = folder(tmp_path / ".out.fedcba9876543210.fastvlm-stage", "user")  # our marker, wrong name
        (forged / replace.MARKER).write_bytes((tmp_path / ours[0] / replace.MARKER).read_bytes())
        replace.recover(out)
        assert (tmp_path / ours[0]).is_dir()  # its writer is alive
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    replace.recover(out)
    assert not (tmp_path / ours[0]).exists() and not out.exists()
    assert hidden(tmp_path) == sorted([unmarked.name, other.name, forged.name])
    assert all((p / "version").read_text() == "user" for p in (unmarked, other, forged))


def test_writer_gone_only_when_certain():
    me = replace._identity(os.getppid())
    assert not replace.writer_gone(me)
    assert not replace.writer_gone({**me, "host": "another-machine"})
    if me["started"] is not None:  # Linux: a reused pid has another start time
        assert replace.writer_gone({**me, "started": "0"})
    if me["boot"] is not None:
        assert replace.writer_gone({**me, "boot": "an-earlier-boot"})
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert replace.writer_gone(replace._identity(child.pid))


def test_disk_full_while_writing_keeps_out_and_leaves_no_temp(tiny_hf, tmp_path, monkeypatch):
    import mlx.core as mx

    import convert.convert as conversion

    out = folder(tmp_path / "out", "old")

    def full(*args, **kwargs):
        raise RuntimeError("[write] Unable to write 8 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", full)
    with pytest.raises(UserError, match="cannot write .*model.safetensors.*free space"):
        convert(tiny_hf[0], out, force=True)
    assert (out / "version").read_text() == "old" and hidden(tmp_path) == []
    monkeypatch.undo()

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(conversion.shutil, "copy2", no_space)
    with pytest.raises(UserError, match="cannot write .*No space left on device"):
        convert(tiny_hf[0], out, force=True)
    assert (out / "version").read_text() == "old" and hidden(tmp_path) == []


def test_unwritable_parent_is_a_clean_error(tiny_hf, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(UserError, match="is a file, so nothing can be written"):
        convert(tiny_hf[0], blocker / "out")
    real_mkdir = os.mkdir

    def read_only(path, *args, dir_fd=None, **kwargs):
        if dir_fd is not None and os.fsdecode(path).startswith("."):
            raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
        return real_mkdir(path, *args, dir_fd=dir_fd, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(UserError, match="cannot write beside .*Read-only file system"):
        convert(tiny_hf[0], tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def dead_writer() -> dict:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return replace._identity(child.pid)


def forged_stage(path: Path, out: Path) -> Path:
    """A folder named and marked like a stage of a killed run for `out`, with a planted `old/<OUT>`."""
    token = path.name.removeprefix(f".{out.name}.").removesuffix(replace.STAGE_SUFFIX)
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)
    marker = dict(tool="fastvlm-mlx", target=out.name, token=token, **dead_writer())
    (path / replace.MARKER).write_text(__import__("json").dumps(marker))
    folder(path / replace.OLD / out.name, "planted")
    folder(path / replace.NEW / out.name, "someone's files")
    return path


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("kind", ["another_user", "group_readable", "symlink", "file"])
def test_forged_stage_is_never_touched_or_published(tmp_path, kind):
    """Only a real folder of ours (our uid, mode 0700) counts as a stage; a marker alone proves nothing."""
    out = tmp_path / "out"
    stage = tmp_path / f".out.{'ab' * 8}{replace.STAGE_SUFFIX}"
    victim = forged_stage(tmp_path / "victim", out)  # another user's folder that a link points at
    if kind == "another_user":
        if os.getuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        forged_stage(stage, out)
        for path in (stage, *stage.rglob("*")):
            os.chown(path, 65534, 65534, follow_symlinks=False)
    elif kind == "group_readable":
        forged_stage(stage, out)
        os.chmod(stage, 0o755)
    elif kind == "symlink":
        stage.symlink_to(victim, target_is_directory=True)
    else:
        stage.write_text("a file")
    before = snapshot(tmp_path)
    replace.recover(out)
    replace.check_output(out, force=True)
    assert not os.path.lexists(out) and snapshot(tmp_path) == before


def test_stage_swapped_for_a_symlink_meanwhile_is_emptied_through_its_descriptor(tmp_path, monkeypatch):
    """The stage is opened once (O_NOFOLLOW) and emptied through that descriptor: a symlink swapped
    in at its name after the check leads nowhere."""
    out = tmp_path / "out"
    victim = folder(tmp_path / "victim", "someone's files")
    folder(victim / "new", "someone's files")
    settle = replace._settle_old

    def swap_then_settle(stage_fd, parent_fd, name, interrupted):
        stage = next(tmp_path.glob(f"*{replace.STAGE_SUFFIX}"))
        stage.rename(tmp_path / "moved-stage")
        stage.symlink_to(victim, target_is_directory=True)
        return settle(stage_fd, parent_fd, name, interrupted)

    monkeypatch.setattr(replace, "_settle_old", swap_then_settle)
    with replace.staged(out, force=False) as new:
        folder(new, "new")
    assert (out / "version").read_text() == "new"
    assert (victim / "version").read_text() == "someone's files" and (victim / "new" / "version").is_file()
    assert list((tmp_path / "moved-stage").iterdir()) == []  # ours, emptied; the link is left as found


PLACEHOLDER_CRASH = """
import os, sys
from pathlib import Path
from convert import replace
from fastvlm_mlx import files
out, force = Path(sys.argv[1]), sys.argv[2] == "force"
files.NATIVE = None  # the portable no-replace rename: mkdir(OUT), then a rename onto it
real_mkdir = os.mkdir

def crash_after_placeholder(path, *args, dir_fd=None, **kwargs):
    real_mkdir(path, *args, dir_fd=dir_fd, **kwargs)
    if dir_fd is not None and os.fsdecode(path) == out.name:
        os._exit(9)

with replace.staged(out, force=force) as new:
    new.mkdir()
    (new / "version").write_text("new")
    os.mkdir = crash_after_placeholder
"""


@pytest.mark.parametrize("force", ["force", "no-force"])
def test_crash_after_the_fallbacks_placeholder_folder_loses_nothing(tmp_path, force):
    """kill -9 between mkdir(OUT) and the rename onto it leaves an empty OUT (and, with force, the
    real OUT in the stage): the next run removes that empty folder of ours and puts OUT back."""
    out = tmp_path / "out"
    if force == "force":
        folder(out, "old")
    assert run_python(PLACEHOLDER_CRASH, str(out), force).wait() == 9
    assert out.is_dir() and list(out.iterdir()) == []  # the placeholder
    if force == "force":
        with pytest.raises(UserError, match="already exists"):
            replace.check_output(out, force=False)
        assert (out / "version").read_text() == "old"
    else:
        replace.recover(out)
        assert not os.path.lexists(out)
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("swap", ["fallback", "no_exchange"])
def test_out_appearing_during_a_forced_replace_keeps_both(tmp_path, monkeypatch, swap):
    """With no atomic swap OUT is moved aside first; if another OUT appears before the new one is
    published, both are kept: the newcomer at OUT, the old one in the stage, named in the error."""
    if swap == "fallback":
        monkeypatch.setattr(files, "NATIVE", None)
    else:
        monkeypatch.setattr(replace, "exchange", lambda *args, **kwargs: False)
    out = folder(tmp_path / "out", "old")
    publish = replace.rename_no_replace

    def someone_else_first(*args, **kwargs):
        if not out.exists():
            folder(out, "someone else's")
        return publish(*args, **kwargs)

    monkeypatch.setattr(replace, "rename_no_replace", someone_else_first)
    with pytest.raises(UserError) as error:
        with replace.staged(out, force=True) as new:
            folder(new, "new")
    message = str(error.value)
    assert "appeared while this ran" in message and "--force" not in message
    kept = Path(message.rsplit("kept at ", 1)[1])
    assert (kept / "version").read_text() == "old" and (out / "version").read_text() == "someone else's"
    monkeypatch.undo()

    stage = kept.parents[1]  # as a later run finds it: its writer gone
    marker = __import__("json").loads((stage / replace.MARKER).read_text())
    (stage / replace.MARKER).write_text(__import__("json").dumps({**marker, **dead_writer()}))
    with pytest.warns(UserWarning, match="you had is at"):
        replace.recover(out)
    assert (kept / "version").read_text() == "old"
    (out / "version").unlink()
    out.rmdir()
    replace.recover(out)  # OUT is free again: the old one goes back
    assert (out / "version").read_text() == "old" and hidden(tmp_path) == []


@pytest.mark.parametrize("where", ["out", "src"])
def test_symlink_loop_is_a_clean_error(tiny_hf, tmp_path, where):
    from tests.test_cli import assert_clean_error, run_cli

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    src, out = (tiny_hf[0], loop) if where == "out" else (loop, tmp_path / "out")
    with pytest.raises(UserError, match="symbolic-link loop|not found"):
        convert(src, out, force=True)
    with pytest.raises(UserError, match="symbolic-link loop"):
        replace.check_apart(src, out)
    assert_clean_error(run_cli("convert", str(src), str(out), "--force"), str(loop))
    assert loop.is_symlink() and not (tmp_path / "out").exists()


def test_symlink_loop_for_export_coreml_is_a_clean_error(tiny_hf, tmp_path):
    pytest.importorskip("coremltools")
    from convert.coreml import export_coreml

    loop = tmp_path / "loop.mlpackage"
    loop.symlink_to(loop)
    with pytest.raises(UserError, match="symbolic-link loop"):
        export_coreml(tiny_hf[0], loop, force=True)
