"""
Built-in, download-free demo corpus for the EfficientVLM main job (`efficientvlm demo`).

`generate_demo_data(output_dir)` draws small synthetic scenes (coloured shapes on a grid, plain background) with
numpy + PIL and writes them in the same X-VLM JSON + image-folder format real users bring, so the demo exercises
the real data path (`trainers.data`) end to end. Same seed -> byte-identical files. No network, no downloads.

Scenes
    Each image is a `grid_size` x `grid_size` grid (2x2 or 3x3) on a plain light-gray background; 1 to
    `max_objects` cells hold one shape each. Object attributes, all uniform at random:
    colour in {red, orange, yellow, green, blue, purple}, shape in {circle, square, triangle, diamond},
    size in {small, large}; a little position jitter (`position_jitter`) and colour jitter add variety. Cell
    names: "top left", "top right", "bottom left", "bottom right" (3x3 adds "top center", "middle left", "center",
    "middle right", "bottom center"). Relations between objects a and b: "a above b" (a's row is higher), "below",
    "to the left of" (a's column is further left), "to the right of"; diagonal cells satisfy two relations.
    Test scenes are unique (no two test images have the same objects in the same cells), and train scenes avoid
    test scenes wherever the grid allows it (one-object scenes can repeat: there are only 4 x 24 of them on 2x2).

Files (under `output_dir`; every `image` path is relative to `output_dir`, the image root)
    images/train_00000.png ...       RGB PNGs, `image_size` x `image_size`; images/test_00000.png ... held out.
    pretrain.json                    [{"image", "caption": [2-3 captions], "negative_caption": [one per caption],
                                     "image_id"}], train images; each caption negative is a caption of the same
                                     template that is false of the scene (drawn from the scene with one thing
                                     changed). With `regions_per_image` > 0 instead of negatives "regions":
                                     [{"caption": "a red square", "bbox": [x, y, width, height]}] (X-VLM's
                                     region-text data, objects named alone).
    retrieval_train.json             [{"image", "caption": [2 captions], "negative_caption": [2], "image_id"}],
                                     train images; both captions exhaustive (every object and its cell), the kind
                                     the test captions are; each with a caption negative: the same caption of the
                                     scene with one colour, shape, cell, colour binding or the count changed.
    retrieval_test.json              [{"image", "caption": [2 captions], "image_id"}], test images; every test
                                     caption lists all objects with their cells, so it matches exactly one image.
    vqa_train.json, vqa_test.json    [{"image", "question", "answer": [10 annotator answers], "question_id",
                                     "question_type"}]; each annotator answers correctly with probability
                                     1 - `answer_noise`, else with another answer the question allows (at most 3
                                     noisy answers per question, so the right answer is always the majority).
    answer_list.json                 every candidate answer (sorted), for answer-list ranking.
    nlvr2_train.json, nlvr2_test.json  [{"images": [left, right], "sentence", "label": bool, "sentence_type"}].
    scenes.json                      [{"image", "split", "image_id", "background", "objects": [{"row", "col",
                                     "position", "color", "shape", "size", "rgb", "bbox": [x0, y0, x1, y1]}]}]
                                     (bbox in pixels, inclusive): the ground truth every text is derived from.
    stats.json                       counts, longest texts, answer distributions and text-only baselines.
    vocab.txt                        a BERT WordPiece vocabulary covering every demo text (`write_demo_vocab`).

Caption templates (pre-training / retrieval; {obj} = "a {color} {shape}", sizes only where shown)
    "{obj} in the {position} , {obj} in the {position} and {obj} in the {position}"   (all objects)
    "there are {number} shapes : {obj} in the {position} and ..."                    (all objects, other order)
    "there are {number} shapes : {obj} , {obj} and {obj}" / "there is one shape : {obj}"
    "a {size} {color} {shape} {relation} a {size} {color} {shape}"
    "a {size} {color} {shape} in the {position}"
    "a picture of {number} shapes" / "a picture of one shape"

VQA question templates ({ref} = "the {shape}" if that shape is unique in the image, or "the {color} shape" if
that colour is unique)
    color            "what color is the {shape} ?"             -> a colour
    shape            "what shape is the {color} object ?"      -> a shape
    count            "how many shapes are there ?"             -> "1" ... str(max_objects)
    position_what    "what is {relation} {ref} ?"              -> the shape of the one object in that relation
    position_yes_no  "is {ref} {relation} {ref} ?"             -> yes / no (asked only when rows, resp. columns,
                                                                 differ: "no" means the reverse relation holds)
    existence        "is there a {color} {shape} ?"            -> yes / no
    Answers need the image: questions are chosen greedily so that, within a split, the counts of the possible
    answers of every question text (and of every question type) differ by at most 2. A text-only model is
    therefore at chance level: stats.json stores, per question type, the answer distribution and the test
    accuracy of the train-majority answer of the type ("majority_baseline") and of the exact question text
    ("text_only_baseline"), as exact match and as VQA accuracy min(#annotators who gave it / 3, 1) ("_vqa").

NLVR2 statement templates ({thing} = "a {color} shape"; `nlvr2_types` picks them, default "both_contain" only)
    both_contain     "both images contain {thing}"               left and right
    neither_contains "neither image contains {thing}"            not left and not right
    at_least_one     "at least one image contains {thing}"       left or right
    only_left        "only the left image contains {thing}"      left and not right
    only_right       "only the right image contains {thing}"     right and not left
    (left / right: that image holds a shape of that colour.) Every (type, colour) sentence is true exactly as
    often as false; its label is drawn first, then a random pair of images giving it: the sentence alone is at
    chance (stats.json: "text_only_baseline" 0.5), and one image alone does not settle it. Why the default is
    one type, of colours only: in the demo's budget its teacher learnt "both images contain a red shape" but not
    shapes ("a circle"), counts, totals, relations, nor a mix of quantifiers (mixed with "neither", the teacher
    scored "both" statements 0.63 and "neither" ones 0.38: it found the colour but not the quantifier).

Texts are lowercase words and the punctuation tokens "?", ":" and ",", separated by spaces; "a" reads "an"
before a vowel ("an orange circle"); counts in answers are digits, numbers in sentences are words.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 135, 20),
    "yellow": (235, 205, 25),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "purple": (145, 60, 195),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, float] = {"small": 0.45, "large": 0.8}  # side of the shape as a fraction of the cell side
# Shapes sit near their cell's centre: a small model learns what a shape is far sooner when it is not also
# moving around its patch (see the `small-cpu` recipe's notes).
DEFAULT_POSITION_JITTER = 0.1
# Region-text items per pre-training image (X-VLM's grounding data) the corpus writes by default: none. With one per
# image the demo's 300 pre-training steps did not learn to ground (box centre in the right cell 0.27, chance 0.25)
# and the retrieval teacher lost (r_mean 0.874 -> 0.818): the region texts ("a red square") repeat across images,
# false negatives for ITC, and take a third of every batch.
DEFAULT_REGIONS_PER_IMAGE = 0
ROW_WORDS = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
COLUMN_WORDS = {2: ("left", "right"), 3: ("left", "center", "right")}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven")
NUMBER_WORDS += ("twelve",)
MAX_OBJECTS_LIMIT = 6  # keeps captions short
RELATIONS: dict[str, Callable[[dict[str, Any], dict[str, Any]], bool]] = {  # phrase -> "a <phrase> b" holds
    "above": lambda a, b: a["row"] < b["row"],
    "below": lambda a, b: a["row"] > b["row"],
    "to the left of": lambda a, b: a["col"] < b["col"],
    "to the right of": lambda a, b: a["col"] > b["col"],
}
VERTICAL_RELATIONS = ("above", "below")
SIDES = ("left", "right")

VQA_TEMPLATES = {
    "color": "what color is the {shape} ?",
    "shape": "what shape is the {color} object ?",
    "count": "how many shapes are there ?",
    "position_what": "what is {relation} {ref} ?",
    "position_yes_no": "is {ref} {relation} {ref2} ?",
    "existence": "is there a {color} {shape} ?",
}
QUESTION_TYPES = tuple(VQA_TEMPLATES)
REFERENCE_TEMPLATES = ("the {shape}", "the {color} shape")
CAPTION_TEMPLATES = (
    "a {color} {shape} in the {position}",
    "{a} , {b} and {c}",
    "there are {number} shapes : {objects}",
    "there is one shape : {objects}",
    "a {size} {color} {shape} {relation} a {size2} {color2} {shape2}",
    "a {size} {color} {shape} in the {position}",
    "a picture of {number} shapes",
    "a picture of one shape",
)
# Every statement says where a colour is present ("a red shape"), in which image(s): its truth is a function of
# (left image contains it, right image contains it), so it is about the pair and needs both images.
NLVR2_TEMPLATES: dict[str, str] = {
    "both_contain": "both images contain {thing}",
    "neither_contains": "neither image contains {thing}",
    "at_least_one": "at least one image contains {thing}",
    "only_left": "only the left image contains {thing}",
    "only_right": "only the right image contains {thing}",
}
NLVR2_TRUTH: dict[str, Callable[[bool, bool], bool]] = {
    "both_contain": lambda left, right: left and right,
    "neither_contains": lambda left, right: not (left or right),
    "at_least_one": lambda left, right: left or right,
    "only_left": lambda left, right: left and not right,
    "only_right": lambda left, right: right and not left,
}
NLVR2_TYPES = tuple(NLVR2_TEMPLATES)
# The statements the demo writes by default: its teacher learns "both images contain" in its budget, not a mix of
# quantifiers (see the module docstring).
DEFAULT_NLVR2_TYPES: tuple[str, ...] = ("both_contain",)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

DEFAULT_SIZES = {False: (1500, 300), True: (200, 60)}  # quick -> (train images, eval images)
NUM_ANNOTATORS = 10
MAX_NOISY_ANSWERS = 3  # keeps the right answer the clear majority of the 10
BALANCE_SLACK = 1  # a question is asked only if its answer leads the text's rarest answer by <= this
_WORD_PATTERN = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class DemoDataPaths:
    """Paths of every file `generate_demo_data` writes; `root` is also the image root of every JSON file."""

    root: Path
    images_dir: Path
    pretrain: Path
    retrieval_train: Path
    retrieval_test: Path
    vqa_train: Path
    vqa_test: Path
    answer_list: Path
    nlvr2_train: Path
    nlvr2_test: Path
    scenes: Path
    stats: Path
    vocab: Path

    @property
    def image_root(self) -> Path:
        return self.root

    def json_files(self) -> list[Path]:
        """Every JSON file written (all `Path` fields except the image folder and the vocabulary)."""
        skip = {"root", "images_dir", "vocab"}
        return [getattr(self, f.name) for f in fields(self) if f.name not in skip]

    @classmethod
    def in_directory(cls, output_dir: str | os.PathLike) -> DemoDataPaths:
        """The paths `generate_demo_data(output_dir)` writes (for reading an already generated corpus)."""
        root = Path(output_dir)
        names = {f.name: root / f"{f.name}.json" for f in fields(cls) if f.name not in ("root", "images_dir")}
        names["vocab"] = root / "vocab.txt"
        return cls(root=root, images_dir=root / "images", **names)


# --------------------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    """BERT basic tokenisation for our texts: lowercase, split on spaces and around punctuation."""
    return _WORD_PATTERN.findall(text.lower())


def _static_words() -> set[str]:
    """Every word any template can produce, for any grid size and object count the generator accepts."""
    templates = [*VQA_TEMPLATES.values(), *REFERENCE_TEMPLATES, *CAPTION_TEMPLATES]
    templates += list(NLVR2_TEMPLATES.values())
    words = {w for t in templates for w in _words(re.sub(r"\{\w+\}", " ", t))}
    fillers = [*COLORS, *SHAPES, *SIZES, *NUMBER_WORDS, *RELATIONS, *SIDES, "yes", "no", "an"]
    fillers += [w for g in (*ROW_WORDS.values(), *COLUMN_WORDS.values()) for w in g]
    fillers += [str(i) for i in range(MAX_OBJECTS_LIMIT + 1)]
    return words | {w for f in fillers for w in _words(f)}


def demo_vocabulary(paths: DemoDataPaths | str | os.PathLike) -> list[str]:
    """Every lowercase word and punctuation token used in the texts (captions, questions, answers, sentences)
    of a generated corpus (`paths` or its output directory), sorted."""
    if not isinstance(paths, DemoDataPaths):
        paths = DemoDataPaths.in_directory(paths)
    texts: list[str] = []
    for path in (paths.pretrain, paths.retrieval_train, paths.retrieval_test):
        texts += [c for r in _read_json(path) for c in r["caption"]]
    for path in (paths.vqa_train, paths.vqa_test):
        texts += [t for r in _read_json(path) for t in [r["question"], *r["answer"]]]
    texts += _read_json(paths.answer_list)
    for path in (paths.nlvr2_train, paths.nlvr2_test):
        texts += [r["sentence"] for r in _read_json(path)]
    return sorted({w for t in texts for w in _words(t)})


def write_demo_vocab(path: str | os.PathLike, words: Iterable[str] | None = None) -> Path:
    """
    Writes a BERT (uncased) WordPiece vocabulary file and returns its path: the special tokens [PAD], [UNK],
    [CLS], [SEP], [MASK] first (ids 0-4), then `words` (default: every word any demo text can contain), then
    every single letter, digit and ASCII punctuation mark and their "##" continuations, so WordPiece never emits
    [UNK] for demo text (nor for any other lowercase ASCII text). Load it with `BertTokenizer(vocab=str(path))`
    (in transformers 5, `vocab_file=` is silently ignored).
    """
    words = sorted(_static_words()) if words is None else list(words)
    for word in words:
        if not isinstance(word, str) or not word or word != word.strip() or " " in word:
            raise ValueError(f"Vocabulary entries must be non-empty strings without spaces, got {word!r}.")
    characters = [*"abcdefghijklmnopqrstuvwxyz0123456789", *"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"]
    tokens = [*SPECIAL_TOKENS, *words, *characters, *(f"##{c}" for c in characters if c.isalnum())]
    tokens = list(dict.fromkeys(tokens))  # drop repeats, keep the first position
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------
# Scenes and images
# --------------------------------------------------------------------------------------------------------------


def _position_name(row: int, col: int, grid_size: int) -> str:
    name = f"{ROW_WORDS[grid_size][row]} {COLUMN_WORDS[grid_size][col]}"
    return "center" if name == "middle center" else name


def _sample_layout(rng: np.random.Generator, grid_size: int, num_objects: int) -> list[tuple[int, int, str, str, str]]:
    """(row, col, color, shape, size) per object, in reading order."""
    cells = sorted(rng.permutation(grid_size * grid_size)[:num_objects].tolist())
    colors, shapes, sizes = list(COLORS), list(SHAPES), list(SIZES)
    attributes = rng.integers((len(colors), len(shapes), len(sizes)), size=(num_objects, 3)).tolist()
    return [
        (cell // grid_size, cell % grid_size, colors[c], shapes[s], sizes[z])
        for cell, (c, s, z) in zip(cells, attributes)
    ]


def _signature(layout: list[tuple[int, int, str, str, str]]) -> tuple:
    """What the exhaustive captions say about a scene (sizes are not part of them)."""
    return tuple((row, col, color, shape) for row, col, color, shape, _ in layout)


def _place(
    rng: np.random.Generator,
    layout: list[tuple[int, int, str, str, str]],
    grid_size: int,
    image_size: int,
    position_jitter: float,
) -> dict[str, Any]:
    """Adds the drawing geometry: background, per-object RGB and pixel bounding box."""
    cell = image_size / grid_size
    background = int(rng.integers(205, 246))
    objects = []
    for row, col, color, shape, size in layout:
        side = max(3, int(round(SIZES[size] * cell * rng.uniform(0.92, 1.06))))
        room = max(0.0, (cell - side) / 2 - 1) * position_jitter  # never out of its cell
        cx = (col + 0.5) * cell + rng.uniform(-room, room)
        cy = (row + 0.5) * cell + rng.uniform(-room, room)
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        rgb = np.clip(np.array(COLORS[color]) + rng.integers(-12, 13, size=3), 0, 255)
        objects.append(
            {
                "row": row,
                "col": col,
                "position": _position_name(row, col, grid_size),
                "color": color,
                "shape": shape,
                "size": size,
                "rgb": [int(v) for v in rgb],
                "bbox": [x0, y0, x0 + side - 1, y0 + side - 1],
            }
        )
    return {"background": [background] * 3, "objects": objects}


def _render(scene: dict[str, Any], image_size: int) -> PIL.Image.Image:
    image = PIL.Image.new("RGB", (image_size, image_size), tuple(scene["background"]))
    draw = PIL.ImageDraw.Draw(image)
    for obj in scene["objects"]:
        x0, y0, x1, y1 = obj["bbox"]
        cx, cy, fill = (x0 + x1) / 2, (y0 + y1) / 2, tuple(obj["rgb"])
        if obj["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj["shape"] == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    return image


def _generate_scenes(
    rng: np.random.Generator,
    split: str,
    count: int,
    grid_size: int,
    max_objects: int,
    image_size: int,
    taken: set[tuple],
    strict: bool,
    position_jitter: float,
) -> list[dict[str, Any]]:
    """
    `count` scenes (1 to `max_objects` objects, uniform) whose signatures avoid `taken` and each other. `strict`
    makes that a must (test split: retrieval needs every exhaustive caption to match one image): after 100 misses
    the object count is redrawn. Otherwise a repeat is accepted after 100 misses, keeping the object count, so that
    count answers stay uniform (there are few one-object scenes).
    """
    # Number of distinct signatures with n objects, and how many of them are taken: no search once all are.
    possible = [math.comb(grid_size * grid_size, n) * (len(COLORS) * len(SHAPES)) ** n for n in range(max_objects + 1)]
    num_taken = Counter(len(signature) for signature in taken)
    scenes = []
    for index in range(count):
        num_objects = int(rng.integers(1, max_objects + 1))
        for attempt in range(10_000):
            if strict and attempt and attempt % 100 == 0:
                num_objects = int(rng.integers(1, max_objects + 1))
            layout = _sample_layout(rng, grid_size, num_objects)
            if _signature(layout) not in taken:
                break
            if not strict and (attempt >= 100 or num_taken[num_objects] >= possible[num_objects]):
                break
        else:
            raise ValueError(
                f"Cannot draw {count} distinct {split} scenes on a {grid_size}x{grid_size} grid with at most "
                f"{max_objects} objects; lower num_eval_images or raise grid_size / max_objects."
            )
        if _signature(layout) not in taken:
            taken.add(_signature(layout))
            num_taken[num_objects] += 1
        name = f"{split}_{index:05d}"
        scene = {"image": f"images/{name}.png", "split": split, "image_id": name}
        scene.update(_place(rng, layout, grid_size, image_size, position_jitter))
        scenes.append(scene)
    return scenes


# --------------------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------------------


def _article(words: str) -> str:
    """ "a red circle", "an orange circle"."""
    return f"an {words}" if words[0] in "aeiou" else f"a {words}"


def _object_phrase(obj: dict[str, Any], with_size: bool = False, with_position: bool = False) -> str:
    words = f"{obj['size']} {obj['color']} {obj['shape']}" if with_size else f"{obj['color']} {obj['shape']}"
    phrase = _article(words)
    return f"{phrase} in the {obj['position']}" if with_position else phrase


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else " , ".join(phrases[:-1]) + " and " + phrases[-1]


def _count_intro(n: int) -> str:
    return "there is one shape :" if n == 1 else f"there are {NUMBER_WORDS[n]} shapes :"


def _exhaustive_captions(scene: dict[str, Any]) -> list[str]:
    """Two captions naming every object and its cell (reading order, then reversed with a count)."""
    objects = scene["objects"]
    forward = _join([_object_phrase(o, with_position=True) for o in objects])
    backward = _join([_object_phrase(o, with_position=True) for o in reversed(objects)])
    return [forward, f"{_count_intro(len(objects))} {backward}"]


def _list_caption(rng: np.random.Generator, objects: list[dict[str, Any]]) -> str:
    order = [objects[int(i)] for i in rng.permutation(len(objects))]
    return f"{_count_intro(len(objects))} {_join([_object_phrase(o) for o in order])}"


def _list_truths(objects: list[dict[str, Any]]) -> set[str]:
    phrases = [_object_phrase(o) for o in objects]
    return {f"{_count_intro(len(objects))} {_join(list(order))}" for order in itertools.permutations(phrases)}


def _object_caption(rng: np.random.Generator, objects: list[dict[str, Any]]) -> str:
    return _object_phrase(objects[int(rng.integers(len(objects)))], with_size=True, with_position=True)


def _object_truths(objects: list[dict[str, Any]]) -> set[str]:
    return {_object_phrase(o, with_size=True, with_position=True) for o in objects}


def _picture_caption(rng: np.random.Generator | None, objects: list[dict[str, Any]]) -> str:
    return "a picture of one shape" if len(objects) == 1 else f"a picture of {NUMBER_WORDS[len(objects)]} shapes"


def _picture_truths(objects: list[dict[str, Any]]) -> set[str]:
    return {_picture_caption(None, objects)}


def _relation_pairs(objects: list[dict[str, Any]]) -> list[str]:
    return [
        f"{_object_phrase(a, with_size=True)} {relation} {_object_phrase(b, with_size=True)}"
        for a in objects
        for b in objects
        if a is not b
        for relation, holds in RELATIONS.items()
        if holds(a, b)
    ]


def _relation_caption(rng: np.random.Generator, objects: list[dict[str, Any]]) -> str | None:
    pairs = _relation_pairs(objects)
    return pairs[int(rng.integers(len(pairs)))] if pairs else None


def _exhaustive_caption(form: int) -> Callable[[np.random.Generator, list[dict[str, Any]]], str]:
    return lambda rng, objects: _exhaustive_captions({"objects": objects})[form]


# Pre-training caption kinds: (draw a caption of these objects, or None; every caption of the kind true of them).
# The second lets a caption negative be checked false of the scene (`_caption_negative`).
CAPTION_KINDS: dict[str, tuple[Callable[..., str | None], Callable[[list[dict[str, Any]]], set[str]]]] = {
    "cells": (_exhaustive_caption(0), lambda objects: {_exhaustive_captions({"objects": objects})[0]}),
    "count_cells": (_exhaustive_caption(1), lambda objects: {_exhaustive_captions({"objects": objects})[1]}),
    "list": (_list_caption, _list_truths),
    "object": (_object_caption, _object_truths),
    "picture": (_picture_caption, _picture_truths),
    "relation": (_relation_caption, lambda objects: set(_relation_pairs(objects))),
}
MAX_NEGATIVE_DRAWS = 50


def _partial_captions(rng: np.random.Generator, scene: dict[str, Any]) -> list[tuple[str, str]]:
    """One (kind, caption) of each partial kind (list without cells, one object, count, relation), shuffled."""
    objects = scene["objects"]
    captions = [(kind, CAPTION_KINDS[kind][0](rng, objects)) for kind in ("list", "object", "picture", "relation")]
    captions = [(kind, caption) for kind, caption in captions if caption is not None]
    return [captions[int(i)] for i in rng.permutation(len(captions))]


def _caption_negative(rng: np.random.Generator, kind: str, scene: dict[str, Any], grid_size: int) -> str:
    """A caption of `kind` that is false of the scene: drawn from the scene with one thing changed
    (`_edited_objects`) until it is none of the kind's true captions (an edit the caption does not mention, or an
    edited object it does not name, leaves it true); the edited scene's exhaustive caption if no draw is false."""
    draw, truths = CAPTION_KINDS[kind]
    true = truths(scene["objects"])
    for _ in range(MAX_NEGATIVE_DRAWS):
        caption = draw(rng, _edited_objects(rng, scene["objects"], grid_size))
        if caption is not None and caption not in true:
            return caption
    return _exhaustive_captions({"objects": _edited_objects(rng, scene["objects"], grid_size)})[1]


def _regions(rng: np.random.Generator, scene: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Up to `count` of the scene's objects as X-VLM region-text data: the object named without its cell ("a
    red square", its size too where that tells it apart or at random) and its box [x, y, width, height] in
    pixels. Only objects the phrase picks out alone: grounding "a red square" in a scene with two of them would
    ask for either box."""
    objects = scene["objects"]
    regions = []
    for index in rng.permutation(len(objects)):
        obj = objects[int(index)]
        with_size = bool(rng.integers(2))
        for sized in (with_size, True):
            phrase = _object_phrase(obj, with_size=sized)
            if sum(_object_phrase(o, with_size=sized) == phrase for o in objects) == 1:
                x0, y0, x1, y1 = obj["bbox"]
                regions.append({"caption": phrase, "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1]})
                break
        if len(regions) == count:
            break
    return regions


def _pretrain_record(
    rng: np.random.Generator,
    scene: dict[str, Any],
    region_rng: np.random.Generator,
    regions_per_image: int,
    negative_rng: np.random.Generator | None = None,
    grid_size: int = 2,
) -> dict[str, Any]:
    form = int(rng.integers(2))
    pool = [(("cells", "count_cells")[form], _exhaustive_captions(scene)[form]), *_partial_captions(rng, scene)]
    pool = [pool[int(i)] for i in rng.permutation(len(pool))][: int(rng.integers(2, 4))]
    record = {"image": scene["image"], "caption": [caption for _, caption in pool], "image_id": scene["image_id"]}
    if negative_rng is not None:
        record["negative_caption"] = [_caption_negative(negative_rng, kind, scene, grid_size) for kind, _ in pool]
    if regions_per_image:
        record["regions"] = _regions(region_rng, scene, regions_per_image)
    return record


NEGATIVE_EDITS = ("color", "shape", "move", "swap", "count")


def _edited_objects(rng: np.random.Generator, objects: list[dict[str, Any]], grid_size: int) -> list[dict[str, Any]]:
    """The objects with one thing changed, so that an exhaustive caption of them is false of the scene: one
    object's colour or shape, one object moved to an empty cell, the colours of two objects swapped (same objects,
    wrong binding), or one object added (in an empty cell) or removed. Reading order, as the captions list them."""
    objects = [dict(o) for o in objects]
    cells = {(o["row"], o["col"]) for o in objects}
    empty = [(r, c) for r in range(grid_size) for c in range(grid_size) if (r, c) not in cells]
    colors = [o["color"] for o in objects]
    possible = {"color": True, "shape": True, "move": bool(empty), "swap": len(set(colors)) > 1}
    possible["count"] = bool(empty) or len(objects) > 1
    edits = [edit for edit in NEGATIVE_EDITS if possible[edit]] or ["color"]
    edit = edits[int(rng.integers(len(edits)))]
    target = objects[int(rng.integers(len(objects)))]
    if edit == "color":
        target["color"] = str(rng.choice([c for c in COLORS if c != target["color"]]))
    elif edit == "shape":
        target["shape"] = str(rng.choice([s for s in SHAPES if s != target["shape"]]))
    elif edit == "move":
        target["row"], target["col"] = empty[int(rng.integers(len(empty)))]
    elif edit == "swap":
        other = objects[int(rng.choice([i for i, c in enumerate(colors) if c != target["color"]]))]
        target["color"], other["color"] = other["color"], target["color"]
    elif empty and (len(objects) == 1 or rng.random() < 0.5):  # count: add an object
        row, col = empty[int(rng.integers(len(empty)))]
        color, shape = str(rng.choice(list(COLORS))), str(rng.choice(list(SHAPES)))
        objects.append({"row": row, "col": col, "color": color, "shape": shape, "size": str(rng.choice(list(SIZES)))})
    else:  # count: remove one
        objects.remove(target)
    for obj in objects:
        obj["position"] = _position_name(obj["row"], obj["col"], grid_size)
    return sorted(objects, key=lambda o: (o["row"], o["col"]))


def _retrieval_train_record(rng: np.random.Generator, scene: dict[str, Any], grid_size: int) -> dict[str, Any]:
    # Both exhaustive captions (the test-time kind, each true of this scene only). Partial captions ("a picture of
    # three shapes") are true of many images, so the ITM hard negatives drawn for them are often true matches
    # labelled 0: with them a 180-step teacher's ITM re-ranking made recall much worse (k=128 r_mean 0.045
    # re-ranked vs 0.273 ITC alone); with these, ITC alone reaches 0.40 and re-ranked 0.21 (k=32).
    # Each caption has a caption negative: the same kind of caption of the scene with one thing changed
    # (`_edited_objects`), an ITM negative that differs from the truth in one attribute (`itm_caption_negatives`).
    captions = _exhaustive_captions(scene)
    negatives = [
        _exhaustive_captions({"objects": _edited_objects(rng, scene["objects"], grid_size)})[form] for form in (0, 1)
    ]
    return {"image": scene["image"], "caption": captions, "negative_caption": negatives, "image_id": scene["image_id"]}


# --------------------------------------------------------------------------------------------------------------
# VQA
# --------------------------------------------------------------------------------------------------------------


def _references(scene: dict[str, Any]) -> list[tuple[dict[str, Any], str, str | None]]:
    """(object, referring phrase, shape the phrase names or None) for every object that can be named uniquely."""
    objects = scene["objects"]
    shapes, colors = Counter(o["shape"] for o in objects), Counter(o["color"] for o in objects)
    references = []
    for obj in objects:
        if shapes[obj["shape"]] == 1:
            references.append((obj, f"the {obj['shape']}", obj["shape"]))
        if colors[obj["color"]] == 1:
            references.append((obj, f"the {obj['color']} shape", None))
    return references


def _vqa_candidates(scene: dict[str, Any], max_objects: int) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """Every well-defined (question type, question, answer, possible answers of that question) for a scene."""
    objects = scene["objects"]
    colors, shapes, yes_no = tuple(COLORS), SHAPES, ("yes", "no")
    references = _references(scene)
    candidates = []
    for obj, _, named_shape in references:
        if named_shape is not None:
            candidates.append(("color", f"what color is the {obj['shape']} ?", obj["color"], colors))
        else:
            candidates.append(("shape", f"what shape is the {obj['color']} object ?", obj["shape"], shapes))
    counts = tuple(str(i) for i in range(1, max_objects + 1))
    candidates.append(("count", VQA_TEMPLATES["count"], str(len(objects)), counts))
    for ref_obj, ref, named_shape in references:
        possible = tuple(s for s in shapes if s != named_shape)
        for relation, holds in RELATIONS.items():
            targets = [o for o in objects if o is not ref_obj and holds(o, ref_obj)]
            if len(targets) == 1:
                candidates.append(("position_what", f"what is {relation} {ref} ?", targets[0]["shape"], possible))
    for a, ref_a, _ in references:
        for b, ref_b, _ in references:
            if a is b:
                continue
            for relation, holds in RELATIONS.items():
                axis = "row" if relation in VERTICAL_RELATIONS else "col"
                if a[axis] != b[axis]:  # same row (column): neither answer would be a clean "no"
                    answer = "yes" if holds(a, b) else "no"
                    candidates.append(("position_yes_no", f"is {ref_a} {relation} {ref_b} ?", answer, yes_no))
    present = {(o["color"], o["shape"]) for o in objects}
    for color in colors:
        for shape in shapes:
            answer = "yes" if (color, shape) in present else "no"
            candidates.append(("existence", f"is there {_article(f'{color} {shape}')} ?", answer, yes_no))
    return candidates


def _annotator_answers(rng: np.random.Generator, answer: str, possible: tuple[str, ...], noise: float) -> list[str]:
    others = [a for a in possible if a != answer]
    noisy = min(int((rng.random(NUM_ANNOTATORS) < noise).sum()), MAX_NOISY_ANSWERS) if others else 0
    answers = [answer] * (NUM_ANNOTATORS - noisy) + [others[int(rng.integers(len(others)))] for _ in range(noisy)]
    return [answers[int(i)] for i in rng.permutation(NUM_ANNOTATORS)]


def _vqa_records(
    rng: np.random.Generator,
    scenes: list[dict[str, Any]],
    questions_per_image: int,
    max_objects: int,
    noise: float,
    first_id: int,
) -> list[dict[str, Any]]:
    """
    Up to `questions_per_image` questions of different types per image. Types are taken least-asked first; within
    a type, a question is allowed only while its answer leads the rarest possible answer of the same question
    text by at most BALANCE_SLACK, and the least over-represented one is taken: so no question text predicts its
    answer, and a model has to look at the image.
    """
    type_counts: Counter[str] = Counter()
    answer_counts: dict[str, Counter[str]] = defaultdict(Counter)  # per type: few texts repeat in a small split
    text_counts: dict[str, Counter[str]] = defaultdict(Counter)
    records = []
    for scene in scenes:
        by_type: dict[str, list[tuple[str, str, str, tuple[str, ...]]]] = defaultdict(list)
        for candidate in _vqa_candidates(scene, max_objects):
            by_type[candidate[0]].append(candidate)
        tie_break = rng.permutation(len(QUESTION_TYPES))
        order = sorted(range(len(QUESTION_TYPES)), key=lambda i: (type_counts[QUESTION_TYPES[i]], tie_break[i]))
        asked = 0
        for type_index in order:
            if asked == questions_per_image:
                break
            qtype = QUESTION_TYPES[type_index]
            scored = []
            for _, question, answer, possible in by_type[qtype]:
                counts, type_answers = text_counts[question], answer_counts[qtype]
                excess = counts[answer] - min(counts[a] for a in possible)
                type_excess = type_answers[answer] - min(type_answers[a] for a in possible)
                if excess <= BALANCE_SLACK and type_excess <= BALANCE_SLACK:
                    scored.append(((type_excess, excess), question, answer, possible))
            if not scored:
                continue
            best = min(s[0] for s in scored)
            scored = [s for s in scored if s[0] == best]
            _, question, answer, possible = scored[int(rng.integers(len(scored)))]
            text_counts[question][answer] += 1
            answer_counts[qtype][answer] += 1
            type_counts[qtype] += 1
            asked += 1
            records.append(
                {
                    "image": scene["image"],
                    "question": question,
                    "answer": _annotator_answers(rng, answer, possible, noise),
                    "question_id": first_id + len(records),
                    "question_type": qtype,
                }
            )
    return records


# --------------------------------------------------------------------------------------------------------------
# NLVR2
# --------------------------------------------------------------------------------------------------------------


def _nlvr2_pair(
    rng: np.random.Generator,
    colors: list[set[str]],
    truth: Callable[[bool, bool], bool],
    label: bool,
    first: int,
) -> tuple[str, list[int]] | None:
    """(colour, image pair) for a statement whose truth, given whether each image holds a shape of the colour, is
    `label`: the `first` colour of `COLORS` if a pair of two images fits it, else the next colour that has one; on
    a corpus of a few images (a smoke run) with no such pair at all, an image paired with itself. None if nothing
    fits."""
    palette = list(COLORS)
    for same in (False, True):
        for shift in range(len(palette)):
            color = palette[(first + shift) % len(palette)]
            for _ in range(100):  # a few hundred random pairs hold every case of a colour many times over
                for pair in rng.integers(len(colors), size=(200, 2)).tolist():
                    if (same or pair[0] != pair[1]) and truth(*(color in colors[i] for i in pair)) == label:
                        return color, pair
    return None


def _nlvr2_records(
    rng: np.random.Generator, scenes: list[dict[str, Any]], count: int, types: tuple[str, ...]
) -> list[dict[str, Any]]:
    """`count` statements of `types`: every (type, colour) sentence equally often and true as often as false
    (exactly, when `count` is a multiple of 2 x types x colours), in a random order; each sentence and label are
    fixed before its image pair is drawn (at random among the pairs giving that label), so the sentence alone does not
    predict the label."""
    colors = [{o["color"] for o in s["objects"]} for s in scenes]
    records = []
    for index in rng.permutation(count).tolist():
        label = index % 2 == 0
        kind = types[(index // 2) % len(types)]
        first = (index // (2 * len(types))) % len(COLORS)
        found = _nlvr2_pair(rng, colors, NLVR2_TRUTH[kind], label, first)
        if found is None:
            raise ValueError(f"No image pair makes a {kind!r} statement {label}; use more images.")
        color, pair = found
        sentence = NLVR2_TEMPLATES[kind].format(thing=_article(f"{color} shape"))
        records.append(
            {
                "images": [scenes[pair[0]]["image"], scenes[pair[1]]["image"]],
                "sentence": sentence,
                "label": label,
                "sentence_type": kind,
            }
        )
    return records


# --------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------


def _vqa_score(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one prediction: min(#annotators who gave it / 3, 1)."""
    return min(answers.count(prediction) / 3.0, 1.0)


def _true_answer(record: dict[str, Any]) -> str:
    return Counter(record["answer"]).most_common(1)[0][0]


def _majority(values: Iterable[str]) -> str:
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))  # ties broken alphabetically, deterministically


def _baselines(train: list[dict[str, Any]], test: list[dict[str, Any]]) -> dict[str, float]:
    """Test accuracy (exact and VQA) of the train-majority answer, and of the train-majority answer per exact
    question text (a text-only model's best; unseen texts fall back to the majority answer)."""
    result: dict[str, float] = {}
    if not train or not test:
        return result
    overall = _majority(_true_answer(r) for r in train)
    per_text: dict[str, list[str]] = defaultdict(list)
    for r in train:
        per_text[r["question"]].append(_true_answer(r))
    text_majority = {q: _majority(a) for q, a in per_text.items()}
    for name, predict in (
        ("majority", lambda r: overall),
        ("text_only", lambda r: text_majority.get(r["question"], overall)),
    ):
        result[f"{name}_baseline"] = _rounded(np.mean([predict(r) == _true_answer(r) for r in test]))
        result[f"{name}_baseline_vqa"] = _rounded(np.mean([_vqa_score(predict(r), r["answer"]) for r in test]))
    return result


def _rounded(value: float) -> float:
    return round(float(value), 4)


def _distribution(values: list[str]) -> dict[str, float]:
    counts = Counter(values)
    return {k: _rounded(counts[k] / len(values)) for k in sorted(counts)}


def _max_words(texts: Iterable[str]) -> int:
    return max((len(_words(t)) for t in texts), default=0)


def _statistics(
    settings: dict[str, Any], records: dict[str, list[dict[str, Any]]], scenes: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    vqa_train, vqa_test = records["vqa_train"], records["vqa_test"]
    per_type = {}
    for qtype in QUESTION_TYPES:
        train = [r for r in vqa_train if r["question_type"] == qtype]
        test = [r for r in vqa_test if r["question_type"] == qtype]
        per_type[qtype] = {
            "train": len(train),
            "test": len(test),
            "answer_distribution": _distribution([_true_answer(r) for r in train]) if train else {},
            "majority_answer": _majority(_true_answer(r) for r in train) if train else None,
            **_baselines(train, test),
        }
    nlvr2: dict[str, Any] = {"true_fraction": {}, "per_type": {}}
    for split in ("train", "test"):
        labels = [r["label"] for r in records[f"nlvr2_{split}"]]
        nlvr2["true_fraction"][split] = _rounded(np.mean(labels)) if labels else None
    for kind in settings["nlvr2_types"]:
        train = [r for r in records["nlvr2_train"] if r["sentence_type"] == kind]
        nlvr2["per_type"][kind] = {
            "train": len(train),
            "test": sum(r["sentence_type"] == kind for r in records["nlvr2_test"]),
            "true_fraction_train": _rounded(np.mean([r["label"] for r in train])) if train else None,
        }
    as_vqa = {
        s: [{"question": r["sentence"], "answer": [str(r["label"])]} for r in records[f"nlvr2_{s}"]]
        for s in ("train", "test")
    }
    nlvr2.update({k: v for k, v in _baselines(as_vqa["train"], as_vqa["test"]).items() if not k.endswith("_vqa")})
    test_captions = [c for r in records["retrieval_test"] for c in r["caption"]]
    texts = {
        "pretrain": [c for r in records["pretrain"] for c in r["caption"]],
        "retrieval_train": [c for r in records["retrieval_train"] for c in r["caption"]],
        "retrieval_test": test_captions,
        "vqa": [r["question"] for r in vqa_train + vqa_test],
        "nlvr2": [r["sentence"] for r in records["nlvr2_train"] + records["nlvr2_test"]],
    }
    return {
        **settings,
        "num_images": {split: len(s) for split, s in scenes.items()},
        "num_records": {name: len(r) for name, r in records.items()},
        "max_words": {name: _max_words(t) for name, t in texts.items()},
        "objects_per_image": {
            split: _distribution([str(len(s["objects"])) for s in split_scenes])
            for split, split_scenes in scenes.items()
        },
        "vqa": {
            "num_answers": len(records["answer_list"]),
            "majority_answer": _majority(_true_answer(r) for r in vqa_train) if vqa_train else None,
            **_baselines(vqa_train, vqa_test),
            "per_type": per_type,
        },
        "nlvr2": nlvr2,
        "retrieval": {
            "test_images": len(records["retrieval_test"]),
            "test_captions": len(test_captions),
            "test_captions_unique": len(set(test_captions)) == len(test_captions),
        },
    }


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`{name}` must be an integer, got {value!r}.")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"`{name}` must be {bound}, got {value}.")
    return int(value)


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, ensure_ascii=True) + "\n", encoding="utf-8")


def generate_demo_data(
    output_dir: str | os.PathLike,
    *,
    seed: int = 0,
    image_size: int = 64,
    num_train_images: int | None = None,
    num_eval_images: int | None = None,
    quick: bool = False,
    grid_size: int = 2,
    max_objects: int = 4,
    questions_per_image: int = 3,
    statements_per_image: int = 2,
    answer_noise: float = 0.1,
    nlvr2_types: Iterable[str] = DEFAULT_NLVR2_TYPES,
    position_jitter: float = DEFAULT_POSITION_JITTER,
    regions_per_image: int = DEFAULT_REGIONS_PER_IMAGE,
) -> DemoDataPaths:
    """
    Writes the demo corpus (see the module docstring) under `output_dir` and returns the paths written.

    Args:
        output_dir: folder to write into (created if needed; files of an earlier run are overwritten).
        seed: the same seed and arguments give byte-identical files.
        image_size: side of the square PNG images in pixels (>= 16 per grid cell).
        num_train_images: training images (default 1500, or 200 with `quick`).
        num_eval_images: held-out images for every test file (default 300, or 60 with `quick`).
        quick: smaller defaults for the 2-minute demo.
        grid_size: 2 or 3 cells per side.
        max_objects: most shapes in one image (2 to min(grid_size ** 2, 6)); images have 1 to max_objects.
        questions_per_image: VQA questions per image, each of a different type (1 to 6).
        statements_per_image: NLVR2 statements per image of the split (1 to 10).
        answer_noise: probability that one of the 10 VQA annotators gives a wrong answer (0 <= noise < 0.5).
        nlvr2_types: the NLVR2 statement types to write (from `NLVR2_TYPES`), in equal shares.
        position_jitter: how far a shape may move off its cell's centre, as a share of the room it has there
            (0: always centred; 1: it may touch the cell's border).
        regions_per_image: objects of each pre-training image written as region-text data (`regions`: the object
            named alone, with its box) for X-VLM's grounding loss; 0 writes none.
    """
    if not isinstance(output_dir, (str, os.PathLike)) or str(output_dir) == "":
        raise ValueError(f"`output_dir` must be a non-empty path, got {output_dir!r}.")
    if not isinstance(quick, bool):
        raise ValueError(f"`quick` must be a bool, got {quick!r}.")
    seed = _check_int("seed", seed, 0)
    grid_size = _check_int("grid_size", grid_size, 2, 3)
    regions_per_image = _check_int("regions_per_image", regions_per_image, 0)
    image_size = _check_int("image_size", image_size, 16 * grid_size, 1024)
    max_objects = _check_int("max_objects", max_objects, 2, min(grid_size * grid_size, MAX_OBJECTS_LIMIT))
    default_train, default_eval = DEFAULT_SIZES[quick]
    num_train_images = _check_int(
        "num_train_images", default_train if num_train_images is None else num_train_images, 2
    )
    num_eval_images = _check_int("num_eval_images", default_eval if num_eval_images is None else num_eval_images, 2)
    questions_per_image = _check_int("questions_per_image", questions_per_image, 1, len(QUESTION_TYPES))
    statements_per_image = _check_int("statements_per_image", statements_per_image, 1, 10)
    if isinstance(answer_noise, bool) or not isinstance(answer_noise, (int, float)) or not 0 <= answer_noise < 0.5:
        raise ValueError(f"`answer_noise` must be a number in [0, 0.5), got {answer_noise!r}.")
    if (
        isinstance(position_jitter, bool)
        or not isinstance(position_jitter, (int, float))
        or not 0 <= position_jitter <= 1
    ):
        raise ValueError(f"`position_jitter` must be a number in [0, 1], got {position_jitter!r}.")

    nlvr2_types = tuple(nlvr2_types) if not isinstance(nlvr2_types, str) else (nlvr2_types,)
    unknown = [kind for kind in nlvr2_types if kind not in NLVR2_TEMPLATES]
    if not nlvr2_types or unknown:
        raise ValueError(f"`nlvr2_types` must be a non-empty choice from {NLVR2_TYPES}; got {list(nlvr2_types)}.")

    paths = DemoDataPaths.in_directory(output_dir)
    paths.images_dir.mkdir(parents=True, exist_ok=True)
    # One independent stream per stage, so e.g. changing the question count leaves the images unchanged.
    streams = np.random.SeedSequence(seed).spawn(8)
    scene_rng, pretrain_rng, retrieval_rng, vqa_rng, nlvr2_rng, region_rng, negative_rng = (
        np.random.default_rng(s) for s in streams[:7]
    )

    # Test scenes first: they must be unique; train scenes then avoid them (see _generate_scenes).
    taken: set[tuple] = set()
    test_scenes = _generate_scenes(
        scene_rng, "test", num_eval_images, grid_size, max_objects, image_size, taken, True, position_jitter
    )
    train_scenes = _generate_scenes(
        scene_rng, "train", num_train_images, grid_size, max_objects, image_size, taken, False, position_jitter
    )
    for scene in test_scenes + train_scenes:
        _render(scene, image_size).save(paths.root / scene["image"], format="PNG", compress_level=1)  # fast

    answers = sorted({*COLORS, *SHAPES, "yes", "no", *(str(i) for i in range(1, max_objects + 1))})
    vqa_train = _vqa_records(vqa_rng, train_scenes, questions_per_image, max_objects, answer_noise, 0)
    records: dict[str, list[Any]] = {
        "pretrain": [
            # Caption negatives only without regions: `PretrainingDataset` does not mix the two.
            _pretrain_record(
                pretrain_rng, s, region_rng, regions_per_image, None if regions_per_image else negative_rng, grid_size
            )
            for s in train_scenes
        ],
        "retrieval_train": [_retrieval_train_record(retrieval_rng, s, grid_size) for s in train_scenes],
        "retrieval_test": [
            {"image": s["image"], "caption": _exhaustive_captions(s), "image_id": s["image_id"]} for s in test_scenes
        ],
        "vqa_train": vqa_train,
        "vqa_test": _vqa_records(vqa_rng, test_scenes, questions_per_image, max_objects, answer_noise, len(vqa_train)),
        "answer_list": answers,
        "nlvr2_train": _nlvr2_records(nlvr2_rng, train_scenes, statements_per_image * num_train_images, nlvr2_types),
        "nlvr2_test": _nlvr2_records(nlvr2_rng, test_scenes, statements_per_image * num_eval_images, nlvr2_types),
    }
    for name, value in records.items():
        _write_json(getattr(paths, name), value)
    _write_json(paths.scenes, train_scenes + test_scenes)
    settings = {
        "seed": seed,
        "image_size": image_size,
        "grid_size": grid_size,
        "max_objects": max_objects,
        "quick": quick,
        "questions_per_image": questions_per_image,
        "statements_per_image": statements_per_image,
        "answer_noise": answer_noise,
        "nlvr2_types": list(nlvr2_types),
        "position_jitter": position_jitter,
        "regions_per_image": regions_per_image,
    }
    _write_json(paths.stats, _statistics(settings, records, {"train": train_scenes, "test": test_scenes}))
    write_demo_vocab(paths.vocab)
    return paths
