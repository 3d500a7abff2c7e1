"""Tests for the built-in demo corpus (`trainers.demo.corpus`): format, determinism, ground truth, balance, vocab."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
from transformers import BertTokenizer

from trainers.data import PretrainingDataset
from trainers.demo.corpus import (
    COLORS,
    DEFAULT_NLVR2_TYPES,
    NLVR2_TYPES,
    NUMBER_WORDS,
    QUESTION_TYPES,
    SHAPES,
    DemoDataPaths,
    demo_vocabulary,
    generate_demo_data,
    write_demo_vocab,
)

YES_NO_TYPES = ("position_yes_no", "existence")
RELATION = {
    "above": lambda a, b: a["row"] < b["row"],
    "below": lambda a, b: a["row"] > b["row"],
    "to the left of": lambda a, b: a["col"] < b["col"],
    "to the right of": lambda a, b: a["col"] > b["col"],
}
REL = "above|below|to the left of|to the right of"
REF = r"the \w+(?: shape)?"


def load(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> DemoDataPaths:
    return generate_demo_data(tmp_path_factory.mktemp("quick"), quick=True)


@pytest.fixture(scope="module")
def scenes(quick: DemoDataPaths) -> dict[str, dict[str, Any]]:
    return {s["image"]: s for s in load(quick.scenes)}


# ---- an independent re-derivation of the ground truth from scenes.json --------------------------------------


def resolve(scene: dict[str, Any], reference: str) -> dict[str, Any]:
    """The one object "the circle" / "the red shape" names; fails if the reference is ambiguous."""
    words = reference.split()
    if words[-1] == "shape":
        matches = [o for o in scene["objects"] if o["color"] == words[1]]
    else:
        matches = [o for o in scene["objects"] if o["shape"] == words[1]]
    assert len(matches) == 1, (reference, scene)
    return matches[0]


def derive_vqa(scene: dict[str, Any], question: str) -> tuple[str, str]:
    """(question type, answer) of a demo question, from the scene."""
    objects = scene["objects"]
    if m := re.fullmatch(r"what color is the (\w+) \?", question):
        return "color", resolve(scene, f"the {m[1]}")["color"]
    if m := re.fullmatch(r"what shape is the (\w+) object \?", question):
        return "shape", resolve(scene, f"the {m[1]} shape")["shape"]
    if question == "how many shapes are there ?":
        return "count", str(len(objects))
    if m := re.fullmatch(rf"what is ({REL}) ({REF}) \?", question):
        anchor = resolve(scene, m[2])
        targets = [o for o in objects if o is not anchor and RELATION[m[1]](o, anchor)]
        assert len(targets) == 1, (question, scene)
        return "position_what", targets[0]["shape"]
    if m := re.fullmatch(rf"is ({REF}) ({REL}) ({REF}) \?", question):
        a, b = resolve(scene, m[1]), resolve(scene, m[3])
        assert a is not b
        axis = "row" if m[2] in ("above", "below") else "col"
        assert a[axis] != b[axis], "a 'no' must mean the reverse relation"
        return "position_yes_no", "yes" if RELATION[m[2]](a, b) else "no"
    if m := re.fullmatch(r"is there an? (\w+) (\w+) \?", question):
        present = any(o["color"] == m[1] and o["shape"] == m[2] for o in objects)
        return "existence", "yes" if present else "no"
    raise AssertionError(f"unknown question template: {question!r}")


def possible_answers(qtype: str, question: str, max_objects: int = 4) -> set[str]:
    if qtype == "color":
        return set(COLORS)
    if qtype == "count":
        return {str(i) for i in range(1, max_objects + 1)}
    if qtype in YES_NO_TYPES:
        return {"yes", "no"}
    named = re.fullmatch(rf"what is (?:{REL}) the (\w+) \?", question)
    return set(SHAPES) - {named[1]} if named else set(SHAPES)


def derive_nlvr2(left: dict[str, Any], right: dict[str, Any], sentence: str) -> bool:
    m = re.fullmatch(
        r"(both images contain|neither image contains|at least one image contains|only the left image contains|"
        r"only the right image contains) an? (\w+) shape",
        sentence,
    )
    if m is None:
        raise AssertionError(f"unknown NLVR2 template: {sentence!r}")
    in_left, in_right = (any(o["color"] == m[2] for o in side["objects"]) for side in (left, right))
    return {
        "both images contain": in_left and in_right,
        "neither image contains": not in_left and not in_right,
        "at least one image contains": in_left or in_right,
        "only the left image contains": in_left and not in_right,
        "only the right image contains": in_right and not in_left,
    }[m[1]]


def all_texts(paths: DemoDataPaths) -> list[str]:
    texts = [
        c
        for name in ("pretrain", "retrieval_train", "retrieval_test")
        for r in load(getattr(paths, name))
        for c in r["caption"]
    ]
    texts += [
        t
        for name in ("vqa_train", "vqa_test")
        for r in load(getattr(paths, name))
        for t in [r["question"], *r["answer"]]
    ]
    texts += [r["sentence"] for name in ("nlvr2_train", "nlvr2_test") for r in load(getattr(paths, name))]
    return texts + load(paths.answer_list)


# ---- tests --------------------------------------------------------------------------------------------------


def test_files_and_quick_sizes(quick: DemoDataPaths) -> None:
    written = sorted(p.name for p in quick.root.iterdir())
    expected = sorted([p.name for p in quick.json_files()] + ["images", "vocab.txt"])
    assert written == expected
    assert DemoDataPaths.in_directory(quick.root) == quick
    stats = load(quick.stats)
    assert stats["num_images"] == {"train": 200, "test": 60}
    assert len(list(quick.images_dir.glob("*.png"))) == 260
    assert len(load(quick.pretrain)) == len(load(quick.retrieval_train)) == 200
    assert len(load(quick.retrieval_test)) == 60
    assert len(load(quick.nlvr2_train)) == 400 and len(load(quick.nlvr2_test)) == 120
    # Nearly every image gets its 3 questions (the balance rule may skip a few).
    assert 0.85 * 600 <= len(load(quick.vqa_train)) <= 600 and 0.85 * 180 <= len(load(quick.vqa_test)) <= 180
    for record in load(quick.pretrain):
        assert set(record) == {"image", "caption", "negative_caption", "image_id"}
        assert 2 <= len(record["caption"]) <= 3 and len(record["negative_caption"]) == len(record["caption"])
    for record in load(quick.retrieval_train):
        assert set(record) == {"image", "caption", "negative_caption", "image_id"}
    question_ids = [r["question_id"] for name in ("vqa_train", "vqa_test") for r in load(getattr(quick, name))]
    assert len(set(question_ids)) == len(question_ids)


def test_regions_name_one_object_and_give_its_box(tmp_path: Path) -> None:
    paths = generate_demo_data(tmp_path / "one", num_train_images=200, num_eval_images=12, regions_per_image=1)
    scenes = {s["image"]: s for s in load(paths.scenes)}
    counts = Counter()
    for record in load(paths.pretrain):
        objects = scenes[record["image"]]["objects"]
        assert len(record["regions"]) <= 1
        for region in record["regions"]:
            words = region["caption"].split()
            # "a red square" or "a large red square": the objects it fits are exactly the one whose box is given.
            fits = [
                o
                for o in objects
                if words[-2:] == [o["color"], o["shape"]] and (len(words) == 3 or words[1] == o["size"])
            ]
            assert len(fits) == 1, (record["image"], region)
            x0, y0, x1, y1 = fits[0]["bbox"]
            assert region["bbox"] == [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
            counts[len(words)] += 1
    assert counts[3] > 40 and counts[4] > 40  # with and without the size
    assert sum(counts.values()) >= 0.95 * 200  # nearly every image has an object its phrase picks out
    pretrain = PretrainingDataset(paths.pretrain, image_root=paths.root)
    assert len(pretrain.region_texts) == sum(counts.values())
    assert all(0 < v < 1 for v in pretrain[len(pretrain.texts)]["bbox"])
    more = generate_demo_data(tmp_path / "more", num_train_images=30, num_eval_images=12, regions_per_image=4)
    assert max(len(r["regions"]) for r in load(more.pretrain)) == 4
    none = generate_demo_data(tmp_path / "none", num_train_images=30, num_eval_images=12)  # the default: none
    assert all("regions" not in r for r in load(none.pretrain))
    # The captions do not move with the regions (their own random stream).
    assert [r["caption"] for r in load(none.pretrain)] == [r["caption"] for r in load(more.pretrain)]


def test_deterministic_per_seed(tmp_path: Path) -> None:
    kwargs = dict(num_train_images=30, num_eval_images=12, image_size=32)
    first, second = generate_demo_data(tmp_path / "a", **kwargs), generate_demo_data(tmp_path / "b", **kwargs)
    other = generate_demo_data(tmp_path / "c", seed=1, **kwargs)

    def contents(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a, b, c = contents(first.root), contents(second.root), contents(other.root)
    assert a == b
    assert a.keys() == c.keys()
    differing = [name for name in a if a[name] != c[name]]
    assert all(p.name in differing for p in first.json_files() if p.name not in ("answer_list.json",))
    assert sum(name.startswith("images/") for name in differing) >= 40  # (almost) every image differs


def test_images_exist_with_the_right_size_and_match_the_scenes(tmp_path: Path, quick: DemoDataPaths) -> None:
    small = generate_demo_data(tmp_path, num_train_images=20, num_eval_images=8, image_size=40)
    for paths, size in ((quick, 64), (small, 40)):
        referenced = set()
        for name in ("pretrain", "retrieval_train", "retrieval_test", "vqa_train", "vqa_test"):
            referenced |= {r["image"] for r in load(getattr(paths, name))}
        for name in ("nlvr2_train", "nlvr2_test"):
            for record in load(getattr(paths, name)):
                assert len(record["images"]) == 2 and record["images"][0] != record["images"][1]
                referenced |= set(record["images"])
        scenes = {s["image"]: s for s in load(paths.scenes)}
        assert referenced == set(scenes)
        for image_path, scene in scenes.items():
            assert not Path(image_path).is_absolute()
            with PIL.Image.open(paths.root / image_path) as image:
                assert image.size == (size, size) and image.mode == "RGB"
                # Every object's centre pixel has the object's colour; the corner is background.
                for obj in scene["objects"]:
                    x0, y0, x1, y1 = obj["bbox"]
                    assert 0 <= x0 < x1 < size and 0 <= y0 < y1 < size
                    assert list(image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))) == obj["rgb"]
                assert list(image.getpixel((0, 0))) == scene["background"]


def offsets_from_cell_centres(paths: DemoDataPaths, image_size: int, grid_size: int = 2) -> list[float]:
    """Per object of every scene: how far its box's centre is from its cell's centre, in pixels (both axes)."""
    cell = image_size / grid_size
    offsets = []
    for scene in load(paths.scenes):
        for obj in scene["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            # The box stays inside its own cell.
            assert obj["col"] * cell <= x0 and x1 < (obj["col"] + 1) * cell
            assert obj["row"] * cell <= y0 and y1 < (obj["row"] + 1) * cell
            offsets += [(x0 + x1) / 2 - (obj["col"] + 0.5) * cell, (y0 + y1) / 2 - (obj["row"] + 0.5) * cell]
    return offsets


def test_position_jitter_moves_shapes_within_their_cells(tmp_path: Path, quick: DemoDataPaths) -> None:
    sizes = dict(num_train_images=60, num_eval_images=20)
    centred = generate_demo_data(tmp_path / "0", position_jitter=0.0, **sizes)
    spread = generate_demo_data(tmp_path / "1", position_jitter=1.0, **sizes)
    assert max(abs(o) for o in offsets_from_cell_centres(centred, 64)) <= 1  # rounding to whole pixels only
    default = np.abs(offsets_from_cell_centres(quick, 64))
    wide = np.abs(offsets_from_cell_centres(spread, 64))
    # A small shape (side ~14 px of a 32 px cell) has ~8 px of room on each side: the default uses a tenth of it.
    assert default.max() <= 2 and wide.max() > 5 and wide.mean() > 3 * default.mean()
    assert load(spread.stats)["position_jitter"] == 1.0


def test_vqa_answers_follow_from_the_scene(quick: DemoDataPaths, scenes: dict[str, dict[str, Any]]) -> None:
    answer_list = set(load(quick.answer_list))
    assert answer_list == set(COLORS) | set(SHAPES) | {"yes", "no", "1", "2", "3", "4"}
    for split in ("vqa_train", "vqa_test"):
        records = load(getattr(quick, split))
        assert {r["question_type"] for r in records} == set(QUESTION_TYPES)
        for record in records:
            qtype, answer = derive_vqa(scenes[record["image"]], record["question"])
            assert record["question_type"] == qtype
            assert len(record["answer"]) == 10 and set(record["answer"]) <= answer_list
            counts = Counter(record["answer"])
            assert counts[answer] >= 7, record  # at most 3 noisy annotators
            assert set(counts) <= possible_answers(qtype, record["question"]), record
        # A little label noise, not none.
        assert 0.02 < sum(a != Counter(r["answer"]).most_common(1)[0][0] for r in records for a in r["answer"]) / (
            10 * len(records)
        )


def test_vqa_needs_the_image(quick: DemoDataPaths) -> None:
    stats = load(quick.stats)["vqa"]
    for split in ("vqa_train", "vqa_test"):
        truth = defaultdict(list)  # question text -> true answers
        per_type = defaultdict(list)
        for record in load(getattr(quick, split)):
            answer = Counter(record["answer"]).most_common(1)[0][0]
            truth[record["question"], record["question_type"]].append(answer)
            per_type[record["question_type"]].append(answer)
        # No question text predicts its answer: its possible answers' counts differ by at most 2.
        for (question, qtype), answers in truth.items():
            counts = Counter(answers)
            spread = max(counts.values()) - min(counts[a] for a in possible_answers(qtype, question))
            assert spread <= 2, (question, counts)
        for qtype, answers in per_type.items():
            share = Counter(answers).most_common(1)[0][1] / len(answers)
            assert share <= (0.53 if qtype in YES_NO_TYPES else 0.35), (split, qtype, share)
    # The stored baselines (train majority evaluated on test) agree: chance level per type.
    for qtype in QUESTION_TYPES:
        entry = stats["per_type"][qtype]
        limit = 0.6 if qtype in YES_NO_TYPES else 0.45
        assert entry["majority_baseline"] < limit and entry["text_only_baseline"] < limit, (qtype, entry)
        assert abs(sum(entry["answer_distribution"].values()) - 1) < 1e-3
    assert stats["majority_baseline"] < 0.3
    train = load(quick.vqa_train)
    majority = Counter(Counter(r["answer"]).most_common(1)[0][0] for r in train).most_common(1)[0][0]
    test = load(quick.vqa_test)
    expected = sum(Counter(r["answer"]).most_common(1)[0][0] == majority for r in test) / len(test)
    assert stats["majority_baseline"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("types", [None, NLVR2_TYPES], ids=["default", "every-type"])
def test_nlvr2_balanced_and_consistent(tmp_path: Path, quick: DemoDataPaths, types: tuple[str, ...] | None) -> None:
    paths = quick if types is None else generate_demo_data(tmp_path, quick=True, nlvr2_types=types)
    scenes = {s["image"]: s for s in load(paths.scenes)}
    for split, prefix in (("nlvr2_train", "images/train_"), ("nlvr2_test", "images/test_")):
        records = load(getattr(paths, split))
        labels = [r["label"] for r in records]
        assert all(isinstance(label, bool) for label in labels)
        assert sum(labels) == len(labels) / 2
        by_type = defaultdict(list)
        for record in records:
            left, right = (scenes[image] for image in record["images"])
            assert all(image.startswith(prefix) for image in record["images"])
            assert derive_nlvr2(left, right, record["sentence"]) == record["label"], record
            by_type[record["sentence_type"]].append(record["label"])
        assert tuple(by_type) == DEFAULT_NLVR2_TYPES if types is None else sorted(by_type) == sorted(types)
        for kind, kind_labels in by_type.items():
            assert sum(kind_labels) == len(kind_labels) / 2, kind
    stats = load(paths.stats)["nlvr2"]
    assert stats["true_fraction"] == {"train": 0.5, "test": 0.5}
    # Every test sentence is true exactly as often as false, so any sentence-only rule scores exactly 0.5.
    assert stats["majority_baseline"] == stats["text_only_baseline"] == 0.5
    for sentence, sentence_labels_ in sentence_labels(load(paths.nlvr2_test)).items():
        assert sentence_labels_.count(True) == sentence_labels_.count(False), sentence


@pytest.mark.parametrize("num_images", [4, 2])
def test_nlvr2_on_a_tiny_corpus(tmp_path: Path, num_images: int) -> None:
    """With a handful of images some colours make no "both images contain" pair true: the sentence takes the next
    colour that does; with two images (the quickstart notebook's smoke corpus) maybe none does, and an image is
    paired with itself. Every label still follows from both scenes."""
    paths = generate_demo_data(
        tmp_path, num_train_images=num_images + 2, num_eval_images=num_images, statements_per_image=10
    )
    scenes = {s["image"]: s for s in load(paths.scenes)}
    for name in ("nlvr2_train", "nlvr2_test"):
        records = load(getattr(paths, name))
        assert sum(r["label"] for r in records) == len(records) / 2
        for record in records:
            assert derive_nlvr2(*(scenes[image] for image in record["images"]), record["sentence"]) == record["label"]


def sentence_labels(records: list[dict[str, Any]]) -> dict[str, list[bool]]:
    labels = defaultdict(list)
    for record in records:
        labels[record["sentence"]].append(record["label"])
    return labels


def test_nlvr2_needs_both_images(quick: DemoDataPaths, scenes: dict[str, dict[str, Any]]) -> None:
    """The best rule that sees the sentence and one image only (does it hold the sentence's colour?) falls short
    of the truth, which needs both images (and gets every label right: `test_nlvr2_balanced_and_consistent`)."""
    records = load(quick.nlvr2_train)
    for side in (0, 1):
        groups: dict[tuple[str, bool], list[bool]] = defaultdict(list)
        for record in records:
            color = record["sentence"].split()[-2]
            seen = any(o["color"] == color for o in scenes[record["images"][side]]["objects"])
            groups[(record["sentence"], seen)].append(record["label"])
        best = sum(max(labels.count(True), labels.count(False)) for labels in groups.values()) / len(records)
        assert 0.6 < best < 0.93, (side, best)


def test_retrieval_test_captions_identify_one_image(quick: DemoDataPaths, scenes: dict[str, dict[str, Any]]) -> None:
    records = load(quick.retrieval_test)
    captions = [c for r in records for c in r["caption"]]
    assert len(set(captions)) == len(captions) == 2 * len(records)
    for record in records:
        scene = scenes[record["image"]]
        for caption in record["caption"]:  # every object is named with its cell
            for obj in scene["objects"]:
                article = "an" if obj["color"] == "orange" else "a"
                assert f"{article} {obj['color']} {obj['shape']} in the {obj['position']}" in caption
            assert caption.count(" in the ") == len(scene["objects"])
    # Test scenes are distinct; train scenes with 2+ objects never repeat a test scene.
    signature = lambda s: tuple((o["row"], o["col"], o["color"], o["shape"]) for o in s["objects"])  # noqa: E731
    test = [signature(s) for s in scenes.values() if s["split"] == "test"]
    train = [signature(s) for s in scenes.values() if s["split"] == "train" and len(s["objects"]) > 1]
    assert len(set(test)) == len(test) and not set(test) & set(train)
    assert load(quick.stats)["retrieval"]["test_captions_unique"] is True


def caption_objects(caption: str) -> set[tuple[str, str, str]]:
    """(colour, shape, cell) of every object an exhaustive caption names."""
    return set(re.findall(r"an? (\w+) (\w+) in the (top left|top right|bottom left|bottom right)", caption))


def test_retrieval_caption_negatives_change_one_thing(quick: DemoDataPaths, scenes: dict[str, dict[str, Any]]) -> None:
    kinds = Counter()
    for record in load(quick.retrieval_train):
        scene = scenes[record["image"]]
        truth = {(o["color"], o["shape"], o["position"]) for o in scene["objects"]}
        assert len(record["negative_caption"]) == len(record["caption"]) == 2
        for caption, negative in zip(record["caption"], record["negative_caption"]):
            assert caption_objects(caption) == truth
            named = caption_objects(negative)
            assert named != truth  # false of the image: an exhaustive caption of other objects
            # The same kind of caption: with a count intro exactly when the positive has one, matching its list.
            assert negative.startswith("there ") == caption.startswith("there ")
            assert negative.count(" in the ") == len(named)
            if negative.startswith("there "):
                count = negative.split(" ")[2]
                assert count == ["zero", "one", "two", "three", "four", "five"][len(named)]
            cells = lambda objects: {cell for _, _, cell in objects}  # noqa: E731
            if len(named) != len(truth):
                kinds["count"] += 1
                assert abs(len(named) - len(truth)) == 1 and len(named ^ truth) == 1
            elif cells(named) != cells(truth):
                kinds["move"] += 1
                assert len(named - truth) == 1 and len(cells(named) ^ cells(truth)) == 2
            elif len(named - truth) == 2:
                kinds["swap"] += 1  # two objects' colours swapped: same colours and shapes, wrong binding
                assert Counter(c for c, _, _ in named) == Counter(c for c, _, _ in truth)
            else:
                changed = (named - truth).pop(), (truth - named).pop()
                kinds["color" if changed[0][0] != changed[1][0] else "shape"] += 1
                assert changed[0][2] == changed[1][2] and (changed[0][0] == changed[1][0]) != (
                    changed[0][1] == changed[1][1]
                )
    assert set(kinds) == {"color", "shape", "move", "swap", "count"} and min(kinds.values()) > 20, kinds


OBJECT = r"an? (?:(small|large) )?(\w+) (\w+)"


def caption_holds(scene: dict[str, Any], caption: str) -> bool:
    """Whether a pre-training caption is true of the scene, read from its words alone."""
    objects = scene["objects"]

    def fits(obj: dict[str, Any], size: str | None, color: str, shape: str) -> bool:
        return obj["color"] == color and obj["shape"] == shape and size in (None, obj["size"])

    if match := re.fullmatch(r"a picture of (\w+) shapes?", caption):
        return match[1] == NUMBER_WORDS[len(objects)]
    if match := re.fullmatch(rf"{OBJECT} ({REL}) {OBJECT}", caption):
        a, b = match.group(1, 2, 3), match.group(5, 6, 7)
        return any(
            fits(x, *a) and fits(y, *b) and RELATION[match[4]](x, y) for x in objects for y in objects if x is not y
        )
    count = None
    if match := re.fullmatch(r"there (?:is|are) (\w+) shapes? : (.*)", caption):
        count, caption = match[1], match[2]
    items = re.split(r" , | and ", caption)
    if count is not None and count != NUMBER_WORDS[len(items)]:
        return False
    named = [re.fullmatch(rf"{OBJECT}(?: in the (.*))?", item).groups() for item in items]
    # "a large red square in the top left": that object is there. Without a size and a count, one object in its
    # cell is the list of every object of a one-object scene (as the retrieval captions list them).
    if len(named) == 1 and count is None and named[0][0] is not None:
        size, color, shape, cell = named[0]
        return any(fits(o, size, color, shape) and o["position"] == cell for o in objects)
    # A list of every object, with or without cells: the same objects, as a multiset.
    with_cells = named[0][3] is not None
    scene_items = Counter((o["color"], o["shape"], o["position"] if with_cells else None) for o in objects)
    return Counter((color, shape, cell) for _, color, shape, cell in named) == scene_items


def test_pretraining_caption_negatives_are_false_of_their_scene(
    quick: DemoDataPaths, scenes: dict[str, dict[str, Any]]
) -> None:
    templates = Counter()
    for record in load(quick.pretrain):
        scene = scenes[record["image"]]
        for caption, negative in zip(record["caption"], record["negative_caption"]):
            assert caption_holds(scene, caption), caption
            assert not caption_holds(scene, negative), (caption, negative)
            # The same template: a relation for a relation, a count for a count, a list of the same form.
            kind = lambda text: (  # noqa: E731
                text.startswith("a picture"),
                re.search(REL, text) is not None,
                text.startswith("there "),
                " in the " in text,
                re.search(r"\b(small|large)\b", text) is not None,
            )
            templates[kind(caption) == kind(negative)] += 1
    assert templates[True] > 0.97 * sum(templates.values()), templates


def test_vocabulary_covers_every_text(tmp_path: Path, quick: DemoDataPaths) -> None:
    grid3 = generate_demo_data(tmp_path / "grid3", num_train_images=40, num_eval_images=15, grid_size=3, max_objects=6)
    vocab_path = write_demo_vocab(tmp_path / "vocab.txt")
    tokens = vocab_path.read_text(encoding="utf-8").splitlines()
    assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(tokens) == len(set(tokens))
    assert quick.vocab.read_text(encoding="utf-8") == vocab_path.read_text(encoding="utf-8")
    tokenizer = BertTokenizer(vocab=str(vocab_path), do_lower_case=True)
    for paths in (quick, grid3):
        words = demo_vocabulary(paths)
        assert words == sorted(set(words)) and set(words) <= set(tokens)
        assert {"?", ":", ",", "circle", "purple", "above", "yes", "4"} <= set(words)
        for text in set(all_texts(paths)):
            assert tokenizer.tokenize(text) == text.split(), text  # one token per word, never [UNK]
    assert demo_vocabulary(quick.root) == demo_vocabulary(quick)
    # Unseen lowercase words fall back to characters, not [UNK].
    assert "[UNK]" not in tokenizer.tokenize("a zebra-striped hexagon 42 !")
    custom = write_demo_vocab(tmp_path / "custom.txt", ["a", "red"])
    assert custom.read_text(encoding="utf-8").splitlines()[5:7] == ["a", "red"]
    with pytest.raises(ValueError, match="without spaces"):
        write_demo_vocab(tmp_path / "bad.txt", ["red circle"])


def test_grid3_answers_follow_from_the_scene(tmp_path: Path) -> None:
    paths = generate_demo_data(tmp_path, num_train_images=40, num_eval_images=15, grid_size=3, max_objects=5)
    scenes = {s["image"]: s for s in load(paths.scenes)}
    assert {len(s["objects"]) for s in scenes.values()} <= {1, 2, 3, 4, 5}
    assert "center" in {o["position"] for s in scenes.values() for o in s["objects"]}
    for record in load(paths.vqa_train) + load(paths.vqa_test):
        qtype, answer = derive_vqa(scenes[record["image"]], record["question"])
        assert Counter(record["answer"]).most_common(1)[0][0] == answer and qtype == record["question_type"]
    for record in load(paths.nlvr2_train) + load(paths.nlvr2_test):
        left, right = (scenes[image] for image in record["images"])
        assert derive_nlvr2(left, right, record["sentence"]) == record["label"]


def test_files_load_with_the_project_datasets(quick: DemoDataPaths) -> None:
    data = pytest.importorskip("trainers.data")
    retrieval = data.ImageTextDataset(quick.retrieval_test, image_root=quick.root)
    assert retrieval.num_images == 60 and len(retrieval) == 120
    vqa = data.VQADataset(quick.vqa_test, image_root=quick.root)
    item = vqa[0]
    assert item["image"].size == (64, 64) and abs(sum(item["answer_weights"]) - 1) < 1e-6
    nlvr2 = data.NLVR2Dataset(quick.nlvr2_test, image_root=quick.root)
    assert len(nlvr2) == 120 and sum(nlvr2.labels) == 60


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(image_size=16), "image_size"),
        (dict(num_train_images=1), "num_train_images"),
        (dict(num_eval_images=True), "num_eval_images"),
        (dict(grid_size=4), "grid_size"),
        (dict(max_objects=1), "max_objects"),
        (dict(grid_size=2, max_objects=5), "max_objects"),
        (dict(questions_per_image=7), "questions_per_image"),
        (dict(statements_per_image=0), "statements_per_image"),
        (dict(answer_noise=0.5), "answer_noise"),
        (dict(position_jitter=1.5), "position_jitter"),
        (dict(position_jitter=True), "position_jitter"),
        (dict(quick="yes"), "quick"),
        (dict(nlvr2_types=("both_contain", "exactly_one")), "nlvr2_types"),
        (dict(nlvr2_types=()), "nlvr2_types"),
        (dict(regions_per_image=-1), "regions_per_image"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_demo_data(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()  # validated before writing anything
    with pytest.raises(ValueError, match="output_dir"):
        generate_demo_data("")
