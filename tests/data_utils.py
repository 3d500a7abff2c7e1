"""
Offline test helpers: a tiny WordPiece vocabulary, tokenizer, processor, images and X-VLM-style JSON files.

Everything is built under a caller-given directory (pytest's `tmp_path`); nothing touches the network.
Token ids are line numbers of the vocabulary file: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import PIL.Image
from transformers import BertTokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "gray"]
SHAPES = ["square", "circle", "triangle", "star", "shape", "box", "ball"]
WORDS = (
    ["a", "an", "the", "picture", "photo", "image", "of", "is", "are", "there", "what", "which", "color", "colour"]
    + ["left", "right", "on", "in", "and", "with", "two", "one", "three", "yes", "no", "true", "false", "how", "many"]
    + ["big", "small", "dog", "cat", "man", "woman", "sitting", "standing", "table", "background", "object", "both"]
    + ["it", "this", "that", "has", "contains", "shows", "images", "side", "top", "bottom", "next", "to"]
    + ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
    + [".", ",", "?", "!", "'"]
)
SUBWORDS = ["##s", "##ing", "##ed", "##er", "##ish"]
VOCAB = SPECIAL_TOKENS + COLOURS + SHAPES + WORDS + SUBWORDS  # 112 tokens, fits the tiny preset (vocab 128)


def write_vocab(directory: str | Path) -> Path:
    """Writes `vocab.txt` (one token per line, the id is the line number) and returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return path


def make_tokenizer(tmp_path: str | Path) -> BertTokenizer:
    """A lowercasing WordPiece `BertTokenizer` (the fast one in transformers 5) over `VOCAB`."""
    return BertTokenizer(vocab=str(write_vocab(Path(tmp_path) / "tokenizer")), do_lower_case=True)


def make_image_processor(image_size: int = 32) -> Any:
    """An `EfficientVLMImageProcessor` producing (3, image_size, image_size) pixel values."""
    from modeling_efficientvlm.image_processing_efficientvlm import EfficientVLMImageProcessor

    return EfficientVLMImageProcessor(size={"height": image_size, "width": image_size})


def make_processor(tmp_path: str | Path, image_size: int = 32, max_length: int = 40) -> Any:
    """An `EfficientVLMProcessor` (image processor + tiny tokenizer)."""
    from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor

    return EfficientVLMProcessor(make_image_processor(image_size), make_tokenizer(tmp_path), max_length=max_length)


def make_image(color: str | tuple[int, int, int] = "red", size: int | tuple[int, int] = 32) -> PIL.Image.Image:
    """A solid-colour RGB PIL image; `size` is an int (square) or (width, height)."""
    if isinstance(size, int):
        size = (size, size)
    return PIL.Image.new("RGB", size, color)


def save_image(path: str | Path, color: str | tuple[int, int, int] = "red", size: int | tuple[int, int] = 32) -> Path:
    """Saves a solid-colour image at `path` (format from the suffix, e.g. .jpg / .png) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(color, size).save(path)
    return path


def _write_json(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_image_text_json(
    tmp_path: str | Path, n: int = 4, captions_per_image: int = 2, name: str = "image_text.json"
) -> tuple[Path, Path]:
    """
    Writes `n` images (`images/img{i}.png`, colour `COLOURS[i]`) and an X-VLM image-text JSON.

    Record `i` has `captions_per_image` captions (a list) when > 1, else a single string; caption `j` of
    image `i` reads "a picture of a {colour} {shape}" with `shape = SHAPES[j]`.
    Returns (json_path, image_root).
    """
    root = Path(tmp_path)
    image_root = root / "images"
    records = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        save_image(image_root / f"img{i}.png", colour, (40 + i, 30 + i))
        captions = [f"a picture of a {colour} {SHAPES[j % len(SHAPES)]}" for j in range(captions_per_image)]
        records.append({"image": f"img{i}.png", "caption": captions if captions_per_image > 1 else captions[0]})
    return _write_json(root / name, records), image_root


def write_vqa_json(tmp_path: str | Path, n: int = 3, name: str = "vqa.json") -> tuple[Path, Path]:
    """
    Writes `n` images and a VQA JSON: record `i` asks "what color is the square ?" with 10 answers
    (7 x colour, 2 x "red", 1 x "blue"; fewer uniques when the colour is red/blue).
    Returns (json_path, image_root).
    """
    root = Path(tmp_path)
    image_root = root / "vqa_images"
    records = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        save_image(image_root / f"q{i}.png", colour)
        answers = [colour] * 7 + ["red", "red", "blue"]
        records.append(
            {"image": f"q{i}.png", "question": "what color is the square ?", "answer": answers, "question_id": 100 + i}
        )
    return _write_json(root / name, records), image_root


def write_nlvr2_json(tmp_path: str | Path, n: int = 4, name: str = "nlvr2.json") -> tuple[Path, Path]:
    """
    Writes `2n` images and an NLVR2 JSON: record `i` pairs `COLOURS[i]` (left) with `COLOURS[i+1]` (right),
    says "the left image is red" style sentences, and alternates labels in the formats True, "False", 1, 0.
    Returns (json_path, image_root).
    """
    root = Path(tmp_path)
    image_root = root / "nlvr2_images"
    labels: list[Any] = [True, "False", 1, 0]
    records = []
    for i in range(n):
        left, right = COLOURS[i % len(COLOURS)], COLOURS[(i + 1) % len(COLOURS)]
        save_image(image_root / f"p{i}-left.png", left)
        save_image(image_root / f"p{i}-right.png", right)
        records.append(
            {
                "images": [f"p{i}-left.png", f"p{i}-right.png"],
                "sentence": f"the left image is {left}",
                "label": labels[i % len(labels)],
            }
        )
    return _write_json(root / name, records), image_root
