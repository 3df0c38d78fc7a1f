"""A shared TMPDIR and a second local user: nothing planted there runs in our process, nothing
of ours there is deleted, nothing is created there, and two users run side by side. Each case
was reproduced against the earlier design (kernels in $TMPDIR/mlx, a wrapper folder in $TMPDIR)."""

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import isolated_environment

from fastvlm_mlx.cpu import private

REPO = Path(__file__).resolve().parents[1]
SECOND_USER = "fastvlm-test2"
needs_linux_compiler = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("g++") is None, reason="MLX's CPU kernel builds need g++"
)


def env_for(home: Path, tmpdir: Path, **extra) -> dict:
    return isolated_environment(home, TMPDIR=str(tmpdir), **extra)


def generate(python: list[str], env: dict, image: Path, *extra: str, user: str | None = None):
    args = ["-m", "fastvlm_mlx.cli", "generate", "--image", str(image), "--prompt", "what shape is it?"]
    return subprocess.run(
        [*python, *args, "--max-tokens", "3", *extra], env=env, capture_output=True, text=True, user=user, cwd="/"
    )


@pytest.fixture
def world(tmp_path_factory):
    """A folder every user can reach (pytest's own is private to root), with an image in it."""
    from PIL import Image

    top = Path(tempfile.mkdtemp(prefix="fastvlm-shared-test-", dir="/tmp"))
    top.chmod(0o755)
    Image.new("RGB", (96, 80), (30, 160, 40)).save(top / "image.png")
    (top / "image.png").chmod(0o644)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@needs_linux_compiler
def test_kernels_planted_in_tmpdir_never_run(world):
    """Learn the names of the kernels a run builds, plant libraries under those names in a shared
    TMPDIR's MLX kernel folder (each writes a file when loaded), run again with that TMPDIR."""
    first = world / "first"
    first.mkdir()
    assert generate([sys.executable], env_for(first, world), world / "image.png").returncode == 0
    names = {p.name for p in first.rglob("lib*.so") if "mlx-kernels" in str(p)}
    assert names, "the first run built no kernel"
    planted = world / "mlx" / mx.__version__ / "cpu"
    planted.mkdir(parents=True)
    marker = world / "planted-code-ran"
    source = world / "evil.c"
    source.write_text(
        f'#include <stdio.h>\n__attribute__((constructor)) static void run(void) {{ fopen("{marker}", "w"); }}\n'
    )
    for name in names:
        subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(planted / name)], check=True)
    before = files(world)
    second = world / "second"
    second.mkdir()
    result = generate([sys.executable], env_for(second, world), world / "image.png")
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    assert files(world) - before == {p for p in files(world) if p.startswith("second")}  # nothing new outside HOME


@needs_linux_compiler
def test_our_files_behind_a_symlinked_kernel_folder_are_kept(world):
    """$TMPDIR/mlx/<version>/cpu made a symlink to a folder of ours holding lib*.so files: they stay."""
    ours = world / "ours"
    ours.mkdir()
    (ours / "libmine.so").write_bytes(b"mine")
    (ours / "mine.cpp").write_text("// not built by fastvlm-mlx\n")
    (world / "mlx" / mx.__version__).mkdir(parents=True)
    (world / "mlx" / mx.__version__ / "cpu").symlink_to(ours)
    home = world / "home"
    home.mkdir()
    assert generate([sys.executable], env_for(home, world), world / "image.png").returncode == 0
    assert sorted(p.name for p in ours.iterdir()) == ["libmine.so", "mine.cpp"]
    assert (ours / "libmine.so").read_bytes() == b"mine"


PATHS = """
import os, fastvlm_mlx
from fastvlm_mlx.cpu import jit, private
from fastvlm_mlx.load import load_model
before = os.environ["PATH"].split(os.pathsep)
load_model()
added = [p for p in os.environ["PATH"].split(os.pathsep) if p not in before]
print(jit.KERNEL_FOLDER[0])
for p in added:
    print(p, private.safe_path(p), oct(os.stat(p).st_mode & 0o777))
"""


@needs_linux_compiler
def test_path_and_tmpdir_point_only_into_the_private_folder(world):
    """What our process (and so its children) gets on PATH and as TMPDIR: folders of ours that
    nobody else can change, which outlive the process; nothing is made in the shared TMPDIR."""
    home = world / "home"
    home.mkdir()
    out = subprocess.run([sys.executable, "-c", PATHS], env=env_for(home, world), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kernels, *added = out.stdout.splitlines()
    root = str(home / ".cache" / "fastvlm-mlx")
    assert kernels.startswith(root) and private.safe_path(kernels)
    for line in added:
        folder, safe, mode = line.split()
        assert folder.startswith(root) and safe == "True" and mode == "0o700" and Path(folder, "g++").is_file()
    assert files(world) == {"image.png"} | {p for p in files(world) if p.startswith("home")}


def second_user() -> tuple[list[str], dict]:
    """(python command, environment additions) to run this checkout as another local user; skips
    where that is impossible (not root, no useradd, no interpreter that user may run)."""
    if os.getuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to make a second local user")
    try:
        pwd.getpwnam(SECOND_USER)
    except KeyError:
        made = subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", SECOND_USER], capture_output=True)
        if made.returncode != 0:
            pytest.skip(f"useradd failed: {made.stderr.decode().strip()}")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.realpath(sys.executable), shutil.which(version, path="/usr/local/bin:/usr/bin:/bin") or ""]
    site = sysconfig.get_paths()["purelib"]
    for python in filter(None, candidates):
        try:
            probe = subprocess.run(
                [python, "-c", "import mlx.core, fastvlm_mlx"],
                env={"PYTHONPATH": f"{REPO}:{site}", "PATH": os.environ["PATH"], "HOME": "/nonexistent"},
                user=SECOND_USER,
                capture_output=True,
                cwd="/",
            )
        except OSError:  # that user may not run it (e.g. an interpreter under /root)
            continue
        if probe.returncode == 0:
            return [python], {"PYTHONPATH": f"{REPO}:{site}"}
    pytest.skip(f"no Python interpreter with this checkout's packages that {SECOND_USER} can run")


@needs_linux_compiler
def test_a_second_user_samples_beside_the_first(world):
    """The first user has made TMPDIR's MLX kernel folder (theirs, 0755); the second user, same
    TMPDIR, samples (temperature > 0: mlx-lm's compiled sampler) and gets an answer."""
    python, extra = second_user()
    kernels = world / "mlx" / mx.__version__ / "cpu"
    kernels.mkdir(parents=True)
    kernels.parent.parent.chmod(0o755)
    first = world / "first"
    first.mkdir()
    theirs = world / "theirs"
    theirs.mkdir()
    shutil.chown(theirs, SECOND_USER, SECOND_USER)
    sampling = ("--temperature", "0.8", "--seed", "3")
    runs = [
        subprocess.Popen(
            [*python, "-m", "fastvlm_mlx.cli", "generate", "--image", str(world / "image.png")]
            + ["--prompt", "what shape is it?", "--max-tokens", "3", *sampling],
            env=env_for(home, world, **extra),
            user=user,
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for home, user in ((first, None), (theirs, SECOND_USER))
    ]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0 and "Traceback" not in err, err
        assert out.strip()
    assert not any(kernels.iterdir())  # neither user built kernels in the shared folder
