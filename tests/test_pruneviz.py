"""prune-viz writes its PNG without ever overwriting or writing through what it did not create."""

import os

import pytest

from fastvlm_mlx import files, pruneviz
from fastvlm_mlx.errors import UserError
from fastvlm_mlx.load import load_model


@pytest.fixture(scope="module")
def model():
    return load_model()[0]  # the shipped easy-VQA model: no torch needed


def draw(model, image_path, output, force=False):
    return pruneviz.draw_pruning(model, image_path, "norm", 0.5, output, force=force)


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_file_appearing_at_the_output_meanwhile_is_kept(model, image_path, tmp_path, monkeypatch):
    output, render = tmp_path / "viz.png", pruneviz.render

    def render_then_race(*args):
        output.write_text("someone else's")
        return render(*args)

    monkeypatch.setattr(pruneviz, "render", render_then_race)
    with pytest.raises(UserError, match="appeared while this ran"):
        draw(model, image_path, output)
    assert output.read_text() == "someone else's" and os.listdir(tmp_path) == ["viz.png"]
    monkeypatch.setattr(files, "NATIVE", None)  # the portable no-replace rename (a hard link)
    output.unlink()
    with pytest.raises(UserError, match="appeared while this ran"):
        draw(model, image_path, output)
    assert output.read_text() == "someone else's" and os.listdir(tmp_path) == ["viz.png"]


def test_link_planted_at_the_partial_name_is_not_written_through(model, image_path, tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("not yours")
    tokens = iter(["planted", "fresh"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(tokens))
    planted = [tmp_path / ".viz.png.planted.partial", tmp_path / f".viz.png.{os.getpid()}.partial"]  # and the old name
    for link in planted:
        link.symlink_to(victim)
    draw(model, image_path, tmp_path / "viz.png")
    assert victim.read_text() == "not yours" and is_png(tmp_path / "viz.png")
    assert all(link.is_symlink() for link in planted)


@pytest.mark.parametrize("target", ["dangling", "a_file"])
def test_symlink_at_the_output_counts_as_existing_and_is_replaced_not_followed(model, image_path, tmp_path, target):
    output, pointee = tmp_path / "viz.png", tmp_path / "pointee"
    if target == "a_file":
        pointee.write_text("not yours")
    output.symlink_to(pointee)
    with pytest.raises(UserError, match="already exists"):
        draw(model, image_path, output)
    assert output.is_symlink()
    draw(model, image_path, output, force=True)
    assert not output.is_symlink() and is_png(output)
    assert pointee.read_text() == "not yours" if target == "a_file" else not os.path.lexists(pointee)
    assert sorted(os.listdir(tmp_path)) == sorted(["viz.png"] + (["pointee"] if target == "a_file" else []))


def test_an_instruction_aware_pruner_draws_for_the_question(image_path, tmp_path):
    from tests.test_cli import assert_clean_error, run_cli

    args = ["--image", str(image_path), "--pruner", "cdpruner", "--keep-ratio", "0.25"]
    assert_clean_error(run_cli("prune-viz", *args, "-o", str(tmp_path / "a.png")), "--prompt")
    assert not (tmp_path / "a.png").exists()
    drawn = run_cli("prune-viz", *args, "--prompt", "what shape is it?", "-o", str(tmp_path / "b.png"))
    assert drawn.returncode == 0, drawn.stderr
    assert is_png(tmp_path / "b.png")
