"""The CPU backend's private folder and kernel builds: MLX's kernel builds in our folder get
-march=native and unit-stride loops, other g++ calls do not; folders others could change are
never used; builds are keyed by the CPU; freed buffers are kept."""

import os
import platform
import stat
import subprocess
import sys

import mlx.core as mx
import pytest

from fastvlm_mlx.cpu import gxx, jit, private

LINUX = sys.platform.startswith("linux")


def macros(compiler: str, source: str, *args: str) -> set[str]:
    command = [compiler, *args, "-dM", "-E", "-x", "c++", source]
    return set(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines())


WRAPPER = """
import shutil, fastvlm_mlx
from fastvlm_mlx.cpu import jit
jit.private_kernel_folder(native=True)
print(jit.native_jit(), shutil.which("g++"), jit._real_gxx())
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="checks x86 ISA macros")
def test_only_builds_in_our_kernel_folder_get_native_flags(tmp_path, isolated_env):
    """In a fresh process: the wrapper is in place (a failed install fails here, not skips),
    builds of a source in its kernel folder get -march=native, others are unchanged."""
    if not jit.native_flags_apply():
        pytest.skip("no g++ here")
    env = isolated_env(tmp_path)
    out = subprocess.run([sys.executable, "-c", WRAPPER], env=env, capture_output=True, text=True, check=True)
    native, wrapper, real = out.stdout.split()
    assert native == "True" and wrapper.startswith(str(tmp_path / ".cache" / "fastvlm-mlx")) and real != wrapper
    kernels = next((tmp_path / ".cache").rglob("mlx-kernels-native")) / "mlx" / mx.__version__ / "cpu"
    kernels.mkdir(parents=True, exist_ok=True)
    kernel, elsewhere = str(kernels / "test.cpp"), str(tmp_path / "mine.cpp")
    for path in (kernel, elsewhere):
        open(path, "w").close()
    assert macros(wrapper, kernel, "-fPIC", "-shared") == macros(real, kernel, "-march=native", "-fPIC", "-shared")
    assert macros(wrapper, elsewhere, "-fPIC", "-shared") == macros(real, elsewhere, "-fPIC", "-shared")
    assert open(elsewhere).read() == ""  # a source outside our kernel folder is not touched


STRIDED = """
import numpy as np, fastvlm_mlx, mlx.core as mx
from fastvlm_mlx.cpu import jit, private
print(jit.private_kernel_folder(native=True))
rng = np.random.default_rng(0)
x, w, t = (rng.standard_normal(s, dtype=np.float32) for s in [(9, 11, 8), (8,), (8, 11)])
unit = mx.compile(lambda x, w: mx.exp(x[1:-1, 2:] * w + 0.5))  # inner stride 1 for all
strided = mx.compile(lambda x, t: x[1:-1, 2:] * t.T[2:] - 1.0)  # t.T: inner stride 11
got = [np.array(unit(mx.array(x), mx.array(w))), np.array(strided(mx.array(x), mx.array(t)))]
want = [np.exp(x[1:-1, 2:] * w + 0.5), x[1:-1, 2:] * t.T[2:] - 1.0]
print(max(float(np.abs(g - v).max() / np.abs(v).max()) for g, v in zip(got, want)))
"""


def test_strided_kernels_get_a_unit_stride_loop_and_stay_right(tmp_path, isolated_env):
    """A slice times a per-channel vector (inner stride 1 everywhere: the new loop) and a slice
    times a transposed input (inner stride 11: the original loop) give numpy's values; the
    kernels are built in the private folder, none in TMPDIR."""
    if not LINUX or not jit.native_flags_apply():
        pytest.skip("no g++ here")
    shared = tmp_path / "shared"
    shared.mkdir()
    env = isolated_env(tmp_path, TMPDIR=str(shared))
    out = subprocess.run([sys.executable, "-c", STRIDED], env=env, capture_output=True, text=True, check=True)
    folder, error = out.stdout.split()
    assert float(error) < 1e-6  # relative to the largest value
    assert folder.startswith(str(tmp_path / ".cache" / "fastvlm-mlx")) and folder.endswith("-native")
    sources = [p.read_text() for p in (tmp_path / ".cache").rglob("*.cpp")]
    assert sources and all(s.startswith(gxx.BUILT) for s in sources)
    strided = [s for s in sources if "_strided_" in s]
    assert len(strided) >= 2 and all(gxx.MARK in s and "#pragma GCC ivdep" in s for s in strided)
    assert list(shared.iterdir()) == []


def test_sources_the_rewrite_does_not_know_are_left_alone():
    assert gxx.unit_stride_loop("int main() { return 0; }") == "int main() { return 0; }"
    kernel = "void k_strided_1(int* shape, int64_t** strides, void** args) {\n  weird();\n}"
    assert gxx.unit_stride_loop(kernel) == kernel


def test_freed_buffers_are_kept_on_the_cpu():
    if mx.default_device() != mx.cpu:
        pytest.skip("CPU only")
    jit.keep_freed_buffers()
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    assert limit == jit.CACHE_LIMIT > 32 << 20


def test_the_cache_key_names_the_cpu(monkeypatch):
    """-march=native builds of one CPU are never found by another sharing the home folder."""
    keys = set()
    for model, flags in [("AMD EPYC", "avx2 avx512f"), ("AMD EPYC", "avx2"), ("Intel Xeon", "avx2")]:
        monkeypatch.setattr(private, "cpu_info", lambda field, m=model, f=flags: m if field == "model name" else f)
        keys.add(private.cpu_key())
    assert len(keys) == 3


def test_safe_path_rejects_what_others_can_change(tmp_path):
    base = tmp_path / "base"
    (base / "ours").mkdir(parents=True)
    assert private.safe_path(str(base / "ours"))
    base.chmod(0o777)  # world-writable, not sticky: others can swap `ours`
    assert not private.safe_path(str(base / "ours"))
    base.chmod(0o777 | stat.S_ISVTX)  # sticky (as /tmp): others cannot rename our entries
    assert private.safe_path(str(base / "ours"))
    base.chmod(0o755)
    if os.getuid() == 0:  # only root can give a folder to another owner
        os.chown(base / "ours", 65534, 65534)
        assert not private.safe_path(str(base / "ours"))
        link = tmp_path / "link"
        link.symlink_to(base / "ours")  # followed: the target counts
        assert not private.safe_path(str(link))


def test_an_unsafe_home_cache_is_not_used(tmp_path, monkeypatch):
    """~/.cache under a world-writable, non-sticky folder (others could swap it between our check
    and a load): the private folder goes elsewhere, or there is none."""
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)
    monkeypatch.setenv("XDG_CACHE_HOME", str(open_parent / "cache"))
    monkeypatch.setattr(private, "_FOLDER", [])
    folder = private.machine_folder()
    assert folder is None or not folder.startswith(str(open_parent))
    assert folder is None or private.safe_path(folder)
    assert list(open_parent.iterdir()) == []  # nothing made there either


def test_a_cache_reached_through_a_link_others_can_repoint_is_used_resolved(tmp_path, monkeypatch):
    """XDG_CACHE_HOME through a symlink in a world-writable folder: the folder we use (and hand to
    MLX and PATH) is the resolved one, so re-pointing the link later changes nothing for us."""
    target = tmp_path / "mine"
    target.mkdir(mode=0o700)
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)
    (open_parent / "link").symlink_to(target)
    monkeypatch.setenv("XDG_CACHE_HOME", str(open_parent / "link"))
    monkeypatch.setattr(private, "_FOLDER", [])
    assert private.machine_folder() == str(target / "fastvlm-mlx" / private.cpu_key())


@pytest.mark.parametrize("base", ["relative/cache", ""])
def test_a_relative_cache_home_is_ignored(tmp_path, monkeypatch, base):
    """A relative folder would move with the working folder of every child process."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", base)
    monkeypatch.setenv("HOME", "")
    monkeypatch.setattr(private, "_FOLDER", [])
    folder = private.machine_folder()
    assert folder is None or os.path.isabs(folder)
    assert list(tmp_path.iterdir()) == []


def test_arm64_cpus_get_keys_of_their_own(monkeypatch):
    """arm64's /proc/cpuinfo has no model name or flags: its part and features name the CPU."""
    keys = set()
    for part, features in [("0xd0c", "fp asimd"), ("0xd40", "fp asimd sve"), ("0xd40", "fp asimd")]:
        info = {"CPU part": part, "Features": features, "CPU implementer": "0x41"}
        monkeypatch.setattr(private, "cpu_info", lambda field, i=info: i.get(field))
        keys.add(private.cpu_key())
    assert len(keys) == 3


def test_builds_are_found_again_whatever_the_umask(tmp_path, monkeypatch):
    """With umask 002 (Ubuntu's default for users) the compiler writes group-writable files; the
    cached library must still be found, not rebuilt by every process."""
    from fastvlm_mlx.cpu import native

    if native.compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(private, "_FOLDER", [])
    previous = os.umask(0o002)
    try:
        first = native.build("int one(void) { return 1; }\n", "one")
        inode = os.stat(first).st_ino
        assert native.build("int one(void) { return 1; }\n", "one") == first
        assert os.stat(first).st_ino == inode and private.owned_file(first)
    finally:
        os.umask(previous)


def test_a_failed_wrapper_install_falls_back_to_mlx_flags(tmp_path, monkeypatch):
    """A full disk or quota while writing the g++ wrapper: MLX's own flags, no partial file left."""
    if not jit.native_flags_apply():
        pytest.skip("no g++ here")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(private, "_FOLDER", [])
    monkeypatch.setattr(jit, "KERNEL_FOLDER", [])
    monkeypatch.setattr(os, "putenv", lambda *a: None)
    path = os.environ["PATH"]
    real_open = os.open

    def full(name, *args, **kwargs):
        if str(name).endswith(f"g++.{os.getpid()}"):
            raise OSError(28, "No space left on device", name)
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", full)
    folder = jit.private_kernel_folder(native=True)
    assert folder is not None and not folder.endswith("-native") and not jit.native_jit()
    assert os.environ["PATH"] == path
    assert not [p for p in tmp_path.rglob("g++*")]


def test_a_symlink_to_a_folder_others_can_write_is_refused(tmp_path, monkeypatch):
    """Our folder's name pointing at a folder anyone may write: not used, nothing written there."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    elsewhere.chmod(0o777)
    (tmp_path / "cache").mkdir(mode=0o700)
    (tmp_path / "cache" / "fastvlm-mlx").symlink_to(elsewhere)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(private, "_FOLDER", [])
    folder = private.machine_folder()
    assert folder is None or not folder.startswith(str(tmp_path))
    assert list(elsewhere.iterdir()) == []


def test_without_a_private_folder_mlx_builds_nothing(monkeypatch):
    """No safe folder to build and load kernels in: MLX's compile is turned off, TMPDIR untouched."""
    disabled, putenv = [], []
    monkeypatch.setattr(jit, "KERNEL_FOLDER", [])
    monkeypatch.setattr(private, "subfolder", lambda name: None)
    monkeypatch.setattr(mx, "disable_compile", lambda: disabled.append(True))
    monkeypatch.setattr(os, "putenv", lambda *a: putenv.append(a))
    assert jit.private_kernel_folder(native=True) is None
    assert disabled == [True] and putenv == [] and not jit.native_jit()
