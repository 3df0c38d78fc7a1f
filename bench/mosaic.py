"""The mosaic testbed: 2x2 mosaics of easy-VQA cells with questions about where things are.

A mosaic is a 128x128 image of four 64x64 cells (top left, top right, bottom left, bottom
right). Each cell holds an easy-VQA image with probability 0.8, else a blank cell of one
uniform colour (each channel uniform in [200, 255], like easy-VQA's backgrounds). Train
mosaics use only easy-VQA's train images, test mosaics only its test images. Every question
follows one of these templates (answers lower case, counts as digits):

    what shape is in the {position}?            circle, rectangle, triangle, or none (blank)
    what color is the shape in the {position}?  an easy-VQA colour; asked only of cells with a shape
    is there a {shape} in the {position}?       yes or no
    how many {shape}s are there?                0 to 4
    how many {color} shapes are there?          0 to 4

A cell's shape and colour are read from easy-VQA's own questions and answers (an image whose
questions do not determine both is not used: 422 of 4000 train and 112 of 1000 test images).
Everything is drawn from one numpy Generator, so a seed fixes the mosaics and their questions.

The full mosaic test set is TEST_MOSAICS mosaics drawn with TEST_SEED; `write_test_set` puts it
on disk as PNGs and questions.json (a JSON list of {image, question, answer, type}, the format
`fastvlm-mlx bench --dataset FILE` reads).
"""

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from bench import easyvqa
from fastvlm_mlx.preprocess import resize_and_crop

CELL, SIDE = 64, 128
SHAPE_SHARE = 0.8  # chance that a cell holds an easy-VQA image
BLANK_LOW, BLANK_HIGH = 200, 255  # a blank cell's channels, inclusive
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # cells in row-major order
SHAPES = ("circle", "rectangle", "triangle")
NONE = "none"
QUESTION_TYPES = ("shape", "color", "is_there", "count_shape", "count_color")
TEST_SEED, TEST_MOSAICS = 20250617, 1000


def colors() -> tuple[str, ...]:
    """easy-VQA's colours: its answers that are neither yes/no nor a shape."""
    import easy_vqa

    return tuple(sorted(set(easy_vqa.get_answers()) - {"yes", "no", *SHAPES}))


@dataclass(frozen=True)
class Cells:
    """The usable easy-VQA images of one split: pixels (N, 64, 64, 3) uint8 and their labels."""

    pixels: np.ndarray
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    image_ids: tuple[int, ...]


@dataclass(frozen=True)
class Mosaic:
    pixels: np.ndarray  # (128, 128, 3) uint8
    shapes: tuple[str, ...]  # per position: a shape or "none"
    colors: tuple[str | None, ...]  # per position: the shape's colour, None for a blank cell
    sources: tuple[int | None, ...]  # per position: the easy-VQA image id, None for a blank cell


@dataclass(frozen=True)
class Question:
    kind: str  # one of QUESTION_TYPES
    text: str
    answer: str


def image_labels(split: easyvqa.Split) -> dict[int, tuple[str, str]]:
    """{image id: (shape, colour)} for every image whose questions determine both.

    An answer that is a shape or colour names the image's own; a yes/no question says whether
    the shape or colour words it names are present (negated when it has " not " or "is no ")."""
    palette, present, absent = set(colors()), {}, {}
    for question, answer, image in zip(split.questions, split.answers, split.image_ids, strict=True):
        words = [w for w in re.findall(r"[a-z]+", question) if w in palette or w in SHAPES]
        if answer in palette or answer in SHAPES:
            present.setdefault(image, set()).update([answer, *words])
            continue
        negated = " not " in question or question.startswith("is no ")
        (present if (answer == "yes") != negated else absent).setdefault(image, set()).update(words)
    labels = {}
    for image in sorted(set(split.image_ids)):
        shape = _the_one(SHAPES, present.get(image, set()), absent.get(image, set()))
        color = _the_one(sorted(palette), present.get(image, set()), absent.get(image, set()))
        if shape and color:
            labels[image] = (shape, color)
    return labels


def _the_one(values, present: set, absent: set) -> str | None:
    """The value named present, or the only one not named absent; None when undetermined."""
    named = [v for v in values if v in present] or [v for v in values if v not in absent]
    return named[0] if len(named) == 1 else None


@cache
def load_cells(split: str) -> Cells:
    """The usable cells of easy-VQA's `split` ("train" or "test"), read once per process."""
    data = easyvqa.load_split(split)
    labels = image_labels(data)
    ids = tuple(labels)
    pixels = np.stack([np.asarray(Image.open(data.image_paths[i]).convert("RGB"), dtype=np.uint8) for i in ids])
    if pixels.shape[1:] != (CELL, CELL, 3):
        raise ValueError(f"easy-VQA images are {pixels.shape[1:]}, expected {(CELL, CELL, 3)}")
    return Cells(pixels, tuple(labels[i][0] for i in ids), tuple(labels[i][1] for i in ids), ids)


def make_mosaic(cells: Cells, rng: np.random.Generator) -> Mosaic:
    """Four cells, each an image of `cells` with probability SHAPE_SHARE, else a blank colour."""
    pixels = np.empty((SIDE, SIDE, 3), dtype=np.uint8)
    shapes, cell_colors, sources = [], [], []
    for n in range(len(POSITIONS)):
        row, col = divmod(n, 2)
        block = pixels[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL]
        if rng.random() < SHAPE_SHARE:
            k = int(rng.integers(len(cells.image_ids)))
            block[:] = cells.pixels[k]
            shapes.append(cells.shapes[k])
            cell_colors.append(cells.colors[k])
            sources.append(cells.image_ids[k])
        else:
            block[:] = rng.integers(BLANK_LOW, BLANK_HIGH + 1, size=3, dtype=np.uint8)
            shapes.append(NONE)
            cell_colors.append(None)
            sources.append(None)
    return Mosaic(pixels, tuple(shapes), tuple(cell_colors), tuple(sources))


def ask(mosaic: Mosaic, rng: np.random.Generator, palette: tuple[str, ...]) -> list[Question]:
    """The mosaic's questions, in a fixed order: every position's shape, the colour of every
    shape, one is-there per position (its own shape with probability 1/2 when it has one, else
    another shape), the count of every shape, and the count of every colour present plus one
    absent colour."""
    questions = [
        Question("shape", f"what shape is in the {p}?", s) for p, s in zip(POSITIONS, mosaic.shapes, strict=False)
    ]
    questions += [
        Question("color", f"what color is the shape in the {p}?", c)
        for p, c in zip(POSITIONS, mosaic.colors, strict=False)
        if c is not None
    ]
    for position, shape in zip(POSITIONS, mosaic.shapes, strict=False):
        others = [s for s in SHAPES if s != shape]
        asked = shape if shape != NONE and rng.random() < 0.5 else str(rng.choice(others))
        questions.append(Question("is_there", f"is there a {asked} in the {position}?", _yes(asked == shape)))
    questions += [Question("count_shape", f"how many {s}s are there?", str(mosaic.shapes.count(s))) for s in SHAPES]
    present = [c for c in palette if c in mosaic.colors]
    missing = [c for c in palette if c not in mosaic.colors]
    for color in present + [str(rng.choice(missing))]:
        questions.append(
            Question("count_color", f"how many {color} shapes are there?", str(mosaic.colors.count(color)))
        )
    return questions


def _yes(truth: bool) -> str:
    return "yes" if truth else "no"


def draw(split: str, count: int, seed: int) -> list[tuple[Mosaic, list[Question]]]:
    """`count` mosaics of `split` with their questions, fixed by `seed`."""
    cells, palette, rng = load_cells(split), colors(), np.random.default_rng(seed)
    drawn = []
    for _ in range(count):
        mosaic = make_mosaic(cells, rng)
        drawn.append((mosaic, ask(mosaic, rng, palette)))
    return drawn


def test_set(count: int | None = None) -> list[tuple[Mosaic, list[Question]]]:
    """The full mosaic test set, or its first `count` mosaics (the same ones)."""
    return draw("test", TEST_MOSAICS, TEST_SEED)[:count]


def every_question_text(palette: tuple[str, ...]) -> list[str]:
    """Every question the templates can make (for building a tokenizer)."""
    texts = [f"what shape is in the {p}?" for p in POSITIONS]
    texts += [f"what color is the shape in the {p}?" for p in POSITIONS]
    texts += [f"is there a {s} in the {p}?" for s in SHAPES for p in POSITIONS]
    texts += [f"how many {s}s are there?" for s in SHAPES]
    return texts + [f"how many {c} shapes are there?" for c in palette]


def every_answer(palette: tuple[str, ...]) -> list[str]:
    return [*SHAPES, NONE, *palette, "yes", "no", *(str(n) for n in range(len(POSITIONS) + 1))]


def write_test_set(folder: Path, count: int | None = None, questions: int | None = None) -> Path:
    """The test set (its first `count` mosaics, or those holding its first `questions` questions)
    as folder/images/NNNN.png and folder/questions.json; returns the JSON file. PNGs already there
    with the same pixels are kept."""
    images = Path(folder) / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, (mosaic, asked) in enumerate(test_set(count)):
        if questions is not None and len(rows) >= questions:
            break
        name = f"images/{n:04d}.png"
        path = Path(folder) / name
        if not path.is_file() or not np.array_equal(np.asarray(Image.open(path).convert("RGB")), mosaic.pixels):
            Image.fromarray(mosaic.pixels).save(path)
        rows += [dict(image=name, question=q.text, answer=q.answer, type=q.kind) for q in asked]
    out = Path(folder) / "questions.json"
    out.write_text(json.dumps(rows[:questions], indent=1))
    return out


def read_test_set(questions_json: Path) -> tuple[easyvqa.Split, list[str]]:
    """A written test set as an easy-VQA Split (one image id per PNG) and each question's type."""
    rows = json.loads(Path(questions_json).read_text())
    names = sorted({r["image"] for r in rows})
    ids = {name: n for n, name in enumerate(names)}
    paths = {ids[name]: Path(questions_json).parent / name for name in names}
    split = easyvqa.Split(
        [r["question"] for r in rows], [r["answer"] for r in rows], [ids[r["image"]] for r in rows], paths
    )
    return split, [r["type"] for r in rows]


def model_pixels(mosaic_pixels: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) uint8 as the runtime prepares the mosaic (PNG -> bicubic resize; crop of a square is none)."""
    return np.asarray(resize_and_crop(Image.fromarray(mosaic_pixels), size), dtype=np.uint8)
