"""The mosaic testbed: its data (seeded, split-pure, exact templates, right answers) and the shipped
mosaic model (the accuracy bar, and pruners told apart at 1/8 of the tokens).

Model accuracy is measured on the first SUBSET mosaics of the test set (the report's table, on the
first 100, is docs/results/mosaic-accuracy.json; the whole set's unpruned accuracy is in
docs/results/mosaic-train.json)."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import easyvqa, mosaic

SUBSET = 120  # mosaics, about 2,150 questions
BAR = 0.95  # issue 17's bar for the unpruned model (97.2% on the full test set)
MARGIN = 0.05  # the spread between methods at keep ratio 1/8; ~0.5-point standard error on 2,150 questions


def same(drawn, other) -> bool:
    return len(drawn) == len(other) and all(
        np.array_equal(a.pixels, b.pixels)
        and (a.shapes, a.colors, a.sources, qa) == (b.shapes, b.colors, b.sources, qb)
        for (a, qa), (b, qb) in zip(drawn, other, strict=True)
    )


def test_the_data_is_fixed_by_its_seed():
    first, again, other = (mosaic.draw("train", 6, seed) for seed in (3, 3, 4))
    assert same(first, again) and not same(first, other)
    assert same(mosaic.test_set(5), mosaic.test_set()[:5])


@pytest.mark.parametrize("split", ["train", "test"])
def test_cells_come_from_their_own_split(split):
    data = easyvqa.load_split(split)
    drawn = mosaic.draw(split, 40, seed=1) if split == "train" else mosaic.test_set(40)
    labels = mosaic.image_labels(data)
    blanks = 0
    for m, _ in drawn:
        for n, source in enumerate(m.sources):
            row, col = divmod(n, 2)
            cell = m.pixels[row * 64 : (row + 1) * 64, col * 64 : (col + 1) * 64]
            if source is None:
                blanks += 1
                assert m.shapes[n] == "none" and m.colors[n] is None
                assert (cell == cell[0, 0]).all() and (cell[0, 0] >= 200).all()
                continue
            assert np.array_equal(cell, np.asarray(Image.open(data.image_paths[source]).convert("RGB")))
            assert (m.shapes[n], m.colors[n]) == labels[source]
    assert 0.1 < blanks / (4 * len(drawn)) < 0.3  # blank with probability 0.2


def test_labels_agree_with_every_easyvqa_answer():
    """Each usable image's (shape, colour) answers all of its easy-VQA questions that name one."""
    data = easyvqa.load_split("test")
    labels = mosaic.image_labels(data)
    assert len(labels) == len(mosaic.load_cells("test").image_ids) >= 850
    for question, answer, image in zip(data.questions, data.answers, data.image_ids, strict=True):
        if image in labels and answer not in ("yes", "no"):
            assert answer in labels[image], (question, answer, labels[image])


def test_questions_follow_the_templates_exactly():
    colors = "|".join(mosaic.colors())
    position = "top left|top right|bottom left|bottom right"
    shapes = "circle|rectangle|triangle"
    templates = {
        "shape": (rf"what shape is in the ({position})\?", rf"{shapes}|none"),
        "color": (rf"what color is the shape in the ({position})\?", colors),
        "is_there": (rf"is there a ({shapes}) in the ({position})\?", "yes|no"),
        "count_shape": (rf"how many ({shapes})s are there\?", "[0-4]"),
        "count_color": (rf"how many ({colors}) shapes are there\?", "[0-4]"),
    }
    seen = set()
    for _, questions in mosaic.test_set(60):
        for q in questions:
            text, answer = templates[q.kind]
            assert re.fullmatch(text, q.text) and re.fullmatch(answer, q.answer), q
            seen.add(q.kind)
    assert seen == set(mosaic.QUESTION_TYPES)
    assert mosaic.colors() == ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")


def test_answers_of_a_constructed_mosaic():
    red = np.zeros((64, 64, 3), np.uint8)
    cells = mosaic.Cells(np.stack([red, red + 1]), ("circle", "triangle"), ("red", "teal"), (7, 9))

    class Picks:  # a stand-in Generator: cell 0, blank, cell 1, cell 0
        draws = iter([0.1, 0, 0.9, 0.1, 1, 0.1, 0])

        def random(self):
            return next(self.draws)

        def integers(self, low, high=None, size=None, dtype=None):
            return np.array([210, 220, 230], np.uint8) if size else next(self.draws)

    m = mosaic.make_mosaic(cells, Picks())
    assert m.shapes == ("circle", "none", "triangle", "circle") and m.sources == (7, None, 9, 7)
    assert (m.pixels[:64, 64:] == [210, 220, 230]).all() and (m.pixels[64:, :64] == 1).all()
    answers = {q.text: q.answer for q in mosaic.ask(m, np.random.default_rng(0), mosaic.colors())}
    assert answers["what shape is in the top left?"] == "circle"
    assert answers["what shape is in the top right?"] == "none"
    assert "what color is the shape in the top right?" not in answers  # never asked of a blank cell
    assert answers["what color is the shape in the bottom left?"] == "teal"
    assert answers["how many circles are there?"] == "2" and answers["how many rectangles are there?"] == "0"
    assert answers["how many red shapes are there?"] == "2" and answers["how many teal shapes are there?"] == "1"
    for text, answer in answers.items():
        if found := re.fullmatch(r"is there a (\w+) in the (.+)\?", text):
            truth = m.shapes[mosaic.POSITIONS.index(found[2])] == found[1]
            assert answer == ("yes" if truth else "no")
    absent = [t for t, a in answers.items() if t.startswith("how many") and "shapes" in t and a == "0"]
    assert len(absent) == 1  # one colour that is not there


def test_two_colour_cells_keep_each_pair_of_colours_and_nothing_else():
    """bench.train_mosaic draws a third of its mosaics from one colour pair's cells, so that `how many
    <colour> shapes` meets counts of 2 to 4; every cell is in each pair of its colour, unchanged."""
    pytest.importorskip("torch", reason="bench.train_mosaic trains with torch")
    from bench import train_mosaic

    cells, palette = mosaic.load_cells("train"), mosaic.colors()
    pairs = train_mosaic.two_color_cells(cells, palette)
    assert len(pairs) == len(palette) * (len(palette) - 1) // 2
    assert sum(len(p.image_ids) for p in pairs) == (len(palette) - 1) * len(cells.image_ids)
    where = {image: n for n, image in enumerate(cells.image_ids)}
    for pair in pairs:
        assert len(set(pair.colors)) == 2
        for pixels, shape, color, image in zip(pair.pixels, pair.shapes, pair.colors, pair.image_ids, strict=True):
            n = where[image]
            assert (shape, color) == (cells.shapes[n], cells.colors[n]) and np.array_equal(pixels, cells.pixels[n])
    drawn = mosaic.make_mosaic(pairs[0], np.random.default_rng(0))
    assert set(drawn.colors) - {None} <= set(pairs[0].colors)


def test_the_written_test_set_reads_back(tmp_path):
    path = mosaic.write_test_set(tmp_path, questions=30)
    split, kinds = mosaic.read_test_set(path)
    drawn = mosaic.test_set(2)
    assert len(kinds) == 30 and split.questions == [q.text for _, qs in drawn for q in qs][:30]
    assert np.array_equal(np.asarray(Image.open(split.image_paths[0])), drawn[0][0].pixels)


# The shipped mosaic model


TRAINED = (Path(__file__).parents[1] / "fastvlm_mlx" / "models" / "mosaic" / "mlx" / "config.json").is_file()
NOT_SHIPPED = "the mosaic model is missing from this checkout (python -m bench.train_mosaic makes it)"


@pytest.fixture(scope="module")
def shipped():
    if not TRAINED:
        pytest.skip(NOT_SHIPPED)
    from fastvlm_mlx import load

    return load("mosaic")


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    return mosaic.read_test_set(mosaic.write_test_set(tmp_path_factory.mktemp("mosaic"), SUBSET))


def test_a_missing_shipped_model_is_one_clear_error(tmp_path, monkeypatch):
    import importlib

    from fastvlm_mlx.errors import UserError
    from fastvlm_mlx.hub import resolve_model

    load_module = importlib.import_module("fastvlm_mlx.load")
    monkeypatch.setattr(load_module, "MODELS_FOLDER", tmp_path)  # an install without the mosaic folders
    with pytest.raises(UserError, match=r"bench[./]train_mosaic"):
        resolve_model("mosaic")


def test_the_shipped_models_are_small_and_selectable(shipped):
    from fastvlm_mlx.hub import resolve_model
    from fastvlm_mlx.load import MODELS_FOLDER, read_config

    folders = [MODELS_FOLDER / name for name in ("mosaic", "mosaic-tuned") if (MODELS_FOLDER / name).is_dir()]
    assert sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file()) <= 20e6
    assert resolve_model("mosaic") != resolve_model(None)
    config = read_config(resolve_model("mosaic"))
    assert (config.image_size, (config.image_size // config.vision.stride) ** 2) == (256, 256)


@pytest.fixture(scope="module")
def vision_cache():
    return {}  # the subset's vision tokens, encoded once for every setting


def test_unpruned_accuracy_reads_every_position(shipped, questions, vision_cache):
    """Issue 17's bar: 95% unpruned. On the full test set the shipped model answers 97.2%: the shape,
    colour and is-there at each position and the shape counts at 99.2-99.9%, `how many <colour>
    shapes` (the hardest: every cell's colour against the question's word) at 87.9%."""
    from bench.mosaic_accuracy import summarize

    split, kinds = questions
    table = summarize(easyvqa.evaluate_mlx(*shipped, split, vision_cache=vision_cache).correct, kinds)
    by_type = {kind: row["accuracy"] for kind, row in table["by_type"].items()}
    assert all(by_type[kind] >= 0.98 for kind in ("shape", "color", "is_there", "count_shape")), by_type
    assert by_type["count_color"] >= 0.8, by_type  # off its prior (63%), where the tied-head model stayed
    assert table["accuracy"] >= BAR, by_type


def test_pruners_are_told_apart_at_an_eighth(shipped, questions, vision_cache):
    """With kept positions (on the first 100 mosaics: 62-88% at 1/8, a 26-point spread); packed,
    every method loses where the cells are and they all land at 48-52% (reported, not asserted)."""
    from pruners import PRUNERS

    split, _ = questions
    options = dict(vision_cache=vision_cache, keep_positions=True)
    eighth = {name: easyvqa.evaluate_mlx(*shipped, split, name, 0.125, **options).accuracy for name in PRUNERS}
    assert max(eighth.values()) - min(eighth.values()) >= MARGIN, eighth


def test_bench_reads_the_mosaic_dataset(tmp_path):
    from bench.sweep import dataset_items

    items = dataset_items("mosaic:40", tmp_path)
    drawn = [q for _, qs in mosaic.test_set(3) for q in qs]
    assert [(i.prompt, i.answer) for i in items] == [(q.text, q.answer) for q in drawn][:40]
    assert all((tmp_path / "mosaic-test" / "images").is_dir() and Path(i.image).is_file() for i in items)


@pytest.mark.parametrize("hits, n", [(0, 17), (17, 17), (0, 1), (1, 1), (50, 100), (1799, 1809)])
def test_wilson_intervals_hold_the_estimate(hits, n):
    from bench.mosaic_accuracy import wilson

    low, high = wilson(hits, n)
    assert 0 <= low <= hits / n <= high <= 1  # at 0 and n rounding once put p just outside (a negative error bar)
    if (hits, n) == (50, 100):
        assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)  # the textbook value
