"""
Datasets and collators for the X-VLM data formats (image-text, VQA, NLVR2).

Datasets read either an X-VLM JSON file (a list of records; image paths relative to `image_root`), an
in-memory list of such records, or a `datasets.Dataset` whose image column is an `Image` feature (or a
list of them) or a string path. Items are raw: RGB PIL images and strings. The collators do all
tokenisation, image processing and batching (`trainers.data.collators`).

Records (fields) -> items (keys):
- `ImageTextDataset`: image, caption (str or list of str), optional image_id -> image, text, image_id.
- `VQADataset`: image, question, answer (list, repeats allowed), optional answer_weight and question_id
  -> image, question, answers (unique), answer_weights, question_id.
- `NLVR2Dataset`: images ([left, right]), sentence, label (bool, "True"/"False" or 0/1) -> images, text, label.
"""

from __future__ import annotations

import abc
import io
import json
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import PIL.Image
from torch.utils.data import Dataset

DataSource = str | os.PathLike | Sequence[dict[str, Any]] | datasets.Dataset


# --------------------------------------------------------------------------------------------------------------
# Reading records and images
# --------------------------------------------------------------------------------------------------------------


def _is_image_feature(feature: Any) -> bool:
    """True for a `datasets.Image` feature or a list/sequence of them."""
    return isinstance(feature, datasets.Image) or isinstance(getattr(feature, "feature", None), datasets.Image)


def _open_image(value: Any, index: int, image_root: Path | None) -> PIL.Image.Image:
    """Loads one image (PIL image, path, or `{"bytes", "path"}` dict) as RGB; errors name record `index`."""
    if isinstance(value, PIL.Image.Image):
        return value.convert("RGB")
    if value is None:
        raise ValueError(f"Record {index}: the image is missing (None).")
    source: Any
    if isinstance(value, dict) and value.get("bytes") is not None:
        source, shown = io.BytesIO(value["bytes"]), f"<{len(value['bytes'])} bytes>"
    elif isinstance(value, dict) and value.get("path") is not None:
        source = _resolve(value["path"], image_root)
        shown = str(source)
    elif isinstance(value, (str, os.PathLike)):
        source = _resolve(value, image_root)
        shown = str(source)
    else:
        raise ValueError(f"Record {index}: unsupported image value of type {type(value).__name__}.")
    if isinstance(source, Path) and not source.is_file():
        raise FileNotFoundError(f"Record {index}: image file {shown} not found.")
    try:
        with PIL.Image.open(source) as image:
            return image.convert("RGB")  # convert() loads the pixels, so the file can be closed
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"Record {index}: cannot read image {shown}: {error}") from error


def _resolve(path: str | os.PathLike, image_root: Path | None) -> Path:
    path = Path(path)
    return path if image_root is None or path.is_absolute() else image_root / path


class _RecordDataset(Dataset, abc.ABC):
    """
    Shared reading logic: `self.records` holds the non-image fields of every record (image paths included
    when they are strings); decoded `datasets.Image` columns are read lazily from `self.hf_dataset`.
    """

    image_column: str = "image"
    text_kind: str = "texts"  # what the texts are called in warnings

    def __init__(
        self,
        data: DataSource,
        image_root: str | os.PathLike | None = None,
        processor: Any = None,
        max_length: int | None = None,
        check_files: bool = True,
    ):
        self.image_root = Path(image_root) if image_root is not None else None
        self.hf_dataset: datasets.Dataset | None = None
        self.lazy_image_column = False
        if isinstance(data, datasets.Dataset):
            if self.image_column not in data.column_names:
                raise ValueError(f"The dataset has no `{self.image_column}` column (columns: {data.column_names}).")
            self.hf_dataset = data
            self.lazy_image_column = _is_image_feature(data.features[self.image_column])
            # Read only the text-like columns now: decoding every image up front would be slow.
            columns = [c for c in data.column_names if not (self.lazy_image_column and c == self.image_column)]
            self.records = data.select_columns(columns).to_list()
        elif isinstance(data, (str, os.PathLike)):
            with open(data, encoding="utf-8") as f:
                self.records = json.load(f)
            if not isinstance(self.records, list):
                raise ValueError(f"{data}: expected a JSON list of records, got {type(self.records).__name__}.")
        elif isinstance(data, Sequence):
            self.records = list(data)
        else:
            raise ValueError(f"Unsupported data source of type {type(data).__name__}.")
        for index, record in enumerate(self.records):
            if not isinstance(record, dict):
                raise ValueError(f"Record {index} is a {type(record).__name__}, expected a dict.")
            if not self.lazy_image_column and self.image_column not in record:
                raise ValueError(f"Record {index} has no `{self.image_column}` field (fields: {sorted(record)}).")
        if check_files and not self.lazy_image_column:
            self._check_files()
        self.num_truncated = _report_long_texts(processor, self._parse_records(), max_length, self.text_kind)

    @abc.abstractmethod
    def _parse_records(self) -> list[str]:
        """Validates `self.records` and fills the dataset's fields; returns the texts the collator tokenises."""

    def _image_values(self, index: int) -> list[Any]:
        value = self.records[index][self.image_column]
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def _check_files(self) -> None:
        for index in range(len(self.records)):
            for value in self._image_values(index):
                if isinstance(value, (str, os.PathLike)) and not _resolve(value, self.image_root).is_file():
                    raise FileNotFoundError(
                        f"Record {index}: image file {_resolve(value, self.image_root)} not found "
                        f"(image_root={self.image_root})."
                    )

    def _load_image(self, index: int) -> Any:
        """The record's image, or list of images, as RGB PIL."""
        if self.lazy_image_column:
            value = self.hf_dataset[index][self.image_column]
        else:
            value = self.records[index][self.image_column]
        if isinstance(value, (list, tuple)):
            return [_open_image(v, index, self.image_root) for v in value]
        return _open_image(value, index, self.image_root)


def _text_field(record: dict[str, Any], names: Sequence[str], index: int) -> Any:
    for name in names:
        if name in record and record[name] is not None:
            return record[name]
    raise ValueError(f"Record {index} has none of the fields {list(names)} (fields: {sorted(record)}).")


def _tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _report_long_texts(processor: Any, texts: list[str], max_length: int | None, what: str) -> int:
    """Counts texts longer than `max_length` tokens (special tokens included) and warns once if any."""
    if processor is None or not texts:
        return 0
    max_length = max_length or getattr(processor, "max_length", None)
    if max_length is None:
        return 0
    lengths = [len(ids) for ids in _tokenizer_of(processor)(texts, truncation=False)["input_ids"]]
    too_long = sum(length > max_length for length in lengths)
    if too_long:
        warnings.warn(
            f"{too_long} of {len(texts)} {what} are longer than max_length={max_length} tokens and will be "
            f"truncated by the collator (longest: {max(lengths)} tokens).",
            UserWarning,
            stacklevel=3,
        )
    return too_long


class _ListDataset(Dataset):
    def __init__(self, length: int, getter: Any):
        self._length, self._getter = length, getter

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._length:
            raise IndexError(index)
        return self._getter(index)


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------


class ImageTextDataset(_RecordDataset):
    """
    Image-text pairs for pre-training, retrieval and captioning; one item per caption.

    A record's `caption` may be a string or a list of strings (`text` is accepted as an alias); a list
    expands to one item per caption. Images get contiguous integer ids: records with the same `image_id`
    field (or, without one, the same image path; else each row) share an id.

    Attributes:
        texts: every caption, in item order.
        text_to_image: `text_to_image[t]` is the image id of caption `t`.
        image_to_texts: `image_to_texts[i]` lists the caption indices of image `i`.
        num_truncated: captions longer than `max_length` tokens (counted when a processor is given).

    Items: `{"image": PIL.Image (RGB), "text": str, "image_id": int}`.

    Args:
        data: JSON path, list of records, or `datasets.Dataset`.
        image_root: folder the image paths are relative to (None: paths are used as written).
        processor: optional processor or tokenizer, only used to count (and warn about) too-long captions.
        max_length: token limit for that count (defaults to `processor.max_length`).
        check_files: check at construction that every image file exists (FileNotFoundError names the record).
    """

    text_kind = "captions"

    def _parse_records(self) -> list[str]:
        self.texts: list[str] = []
        self.text_to_image: list[int] = []
        self.image_to_texts: list[list[int]] = []
        self._image_record: list[int] = []  # image id -> index of a record holding that image
        self._text_record: list[int] = []  # text index -> record index
        ids: dict[Any, int] = {}
        for index, record in enumerate(self.records):
            captions = _text_field(record, ("caption", "text"), index)
            captions = [captions] if isinstance(captions, str) else list(captions)
            if not captions or not all(isinstance(c, str) for c in captions):
                raise ValueError(f"Record {index}: `caption` must be a string or a non-empty list of strings.")
            key = self._image_key(record, index)
            if key not in ids:
                ids[key] = len(ids)
                self._image_record.append(index)
                self.image_to_texts.append([])
            image_id = ids[key]
            for caption in captions:
                self.image_to_texts[image_id].append(len(self.texts))
                self.text_to_image.append(image_id)
                self._text_record.append(index)
                self.texts.append(caption.strip())
        return self.texts

    def _image_key(self, record: dict[str, Any], index: int) -> Any:
        if record.get("image_id") is not None:
            return ("id", record["image_id"])
        value = None if self.lazy_image_column else record.get(self.image_column)
        if isinstance(value, (str, os.PathLike)):
            return ("path", str(_resolve(value, self.image_root)))
        return ("row", index)

    @property
    def num_images(self) -> int:
        return len(self.image_to_texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": self._load_image(self._text_record[index]),
            "text": self.texts[index],
            "image_id": self.text_to_image[index],
        }

    def get_image(self, image_id: int) -> PIL.Image.Image:
        """The RGB image with id `image_id`."""
        return self._load_image(self._image_record[image_id])

    def image_view(self) -> Dataset:
        """A dataset over distinct images (for retrieval): items `{"image", "image_id"}`, ordered by id."""
        return _ListDataset(self.num_images, lambda i: {"image": self.get_image(i), "image_id": i})

    def text_view(self) -> Dataset:
        """A dataset over captions without loading images: items `{"text", "image_id"}`."""
        return _ListDataset(len(self.texts), lambda t: {"text": self.texts[t], "image_id": self.text_to_image[t]})


class VQADataset(_RecordDataset):
    """
    Visual question answering; one item per question.

    `answer` is a list of annotator answers (repeats allowed) or a string; without `answer_weight` each
    unique answer weighs count / number of answers (X-VLM's rule); with `answer_weight` (one per answer)
    the weights of repeated answers are summed. A record without answers (a test split) gets empty lists.

    Attributes:
        references: the raw answer lists (repeats kept), as VQA accuracy needs them.

    Items: `{"image": PIL.Image, "question": str, "answers": list[str] (unique),
    "answer_weights": list[float], "question_id": record's question_id or the index}`.
    """

    text_kind = "questions"

    def _parse_records(self) -> list[str]:
        self.questions: list[str] = []
        self.answers: list[list[str]] = []
        self.answer_weights: list[list[float]] = []
        self.references: list[list[str]] = []
        for index, record in enumerate(self.records):
            question = _text_field(record, ("question", "text"), index)
            if not isinstance(question, str):
                raise ValueError(f"Record {index}: `question` must be a string.")
            self.questions.append(question.strip())
            raw = record.get("answer", record.get("answers"))
            raw = [] if raw is None else [raw] if isinstance(raw, str) else list(raw)
            if not all(isinstance(a, str) for a in raw):
                raise ValueError(f"Record {index}: `answer` must be a string or a list of strings.")
            weights = record.get("answer_weight")
            if weights is None:
                counts = Counter(raw)
                merged = {answer: count / len(raw) for answer, count in counts.items()}
            else:
                if len(weights) != len(raw):
                    raise ValueError(
                        f"Record {index}: {len(weights)} answer weights for {len(raw)} answers; give one per answer."
                    )
                merged = {}
                for answer, weight in zip(raw, weights):
                    merged[answer] = merged.get(answer, 0.0) + float(weight)
            self.references.append(raw)
            self.answers.append(list(merged))
            self.answer_weights.append(list(merged.values()))
        return self.questions

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": self._load_image(index),
            "question": self.questions[index],
            "answers": self.answers[index],
            "answer_weights": self.answer_weights[index],
            "question_id": self.records[index].get("question_id", index),
        }


def _parse_label(value: Any, index: int) -> int:
    """NLVR2 label to 0/1: accepts bools, "True"/"False" (any case) and 0/1."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    if isinstance(value, int) and value in (0, 1):
        return value
    raise ValueError(f"Record {index}: label {value!r} is not a boolean, 'True'/'False' or 0/1.")


class NLVR2Dataset(_RecordDataset):
    """
    NLVR2: a sentence about a pair of images, true or false.

    Items: `{"images": [PIL.Image, PIL.Image], "text": str, "label": int (1 = true)}`.
    """

    image_column = "images"
    text_kind = "sentences"

    def _parse_records(self) -> list[str]:
        self.sentences: list[str] = []
        self.labels: list[int] = []
        for index, record in enumerate(self.records):
            if not self.lazy_image_column and len(self._image_values(index)) != 2:
                raise ValueError(f"Record {index}: `images` must hold exactly 2 images.")
            sentence = _text_field(record, ("sentence", "text"), index)
            if not isinstance(sentence, str):
                raise ValueError(f"Record {index}: `sentence` must be a string.")
            self.sentences.append(sentence.strip())
            self.labels.append(_parse_label(_text_field(record, ("label",), index), index))
        return self.sentences

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        images = self._load_image(index)
        if len(images) != 2:
            raise ValueError(f"Record {index}: `images` must hold exactly 2 images, got {len(images)}.")
        return {"images": images, "text": self.sentences[index], "label": self.labels[index]}
