"""
Datasets and collators for the X-VLM data formats (image-text, VQA, NLVR2).

Datasets read either an X-VLM JSON file (a list of records; image paths relative to `image_root`), an
in-memory list of such records, or a `datasets.Dataset` whose image column is an `Image` feature (or a
list of them) or a string path. Items are raw: RGB PIL images and strings. The collators do all
tokenisation, image processing and batching with an `EfficientVLMProcessor`, and return dicts of tensors
with the names the models read.

Records (fields) -> items (keys):
- `ImageTextDataset`: image, caption (str or list of str), optional image_id -> image, text, image_id.
- `VQADataset`: image, question, answer (list, repeats allowed), optional answer_weight and question_id
  -> image, question, answers (unique), answer_weights, question_id.
- `NLVR2Dataset`: images ([left, right]), sentence, label (bool, "True"/"False" or 0/1) -> images, text, label.

Collators (output keys):
- `ImageTextCollator`: pixel_values, input_ids, attention_mask, image_ids.
- `PretrainingCollator`: the above + mlm_input_ids, mlm_labels.
- `CaptioningCollator`: pixel_values, input_ids, attention_mask, labels.
- `VQACollator`: pixel_values, input_ids, attention_mask, answer_input_ids, answer_attention_mask,
  answer_weights, answer_counts.
- `NLVR2Collator`: pixel_values (B, 2, 3, H, W), input_ids, attention_mask, labels.
"""

from __future__ import annotations

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
import torch
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


class _RecordDataset(Dataset):
    """
    Shared reading logic: `self.records` holds the non-image fields of every record (image paths included
    when they are strings); decoded `datasets.Image` columns are read lazily from `self.hf_dataset`.
    """

    image_column: str = "image"

    def __init__(self, data: DataSource, image_root: str | os.PathLike | None = None, check_files: bool = True):
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

    def __init__(
        self,
        data: DataSource,
        image_root: str | os.PathLike | None = None,
        processor: Any = None,
        max_length: int | None = None,
        check_files: bool = True,
    ):
        super().__init__(data, image_root, check_files)
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
        self.num_truncated = _report_long_texts(processor, self.texts, max_length, "captions")

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

    def __init__(
        self,
        data: DataSource,
        image_root: str | os.PathLike | None = None,
        processor: Any = None,
        max_length: int | None = None,
        check_files: bool = True,
    ):
        super().__init__(data, image_root, check_files)
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
        self.num_truncated = _report_long_texts(processor, self.questions, max_length, "questions")

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

    def __init__(
        self,
        data: DataSource,
        image_root: str | os.PathLike | None = None,
        processor: Any = None,
        max_length: int | None = None,
        check_files: bool = True,
    ):
        super().__init__(data, image_root, check_files)
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
        self.num_truncated = _report_long_texts(processor, self.sentences, max_length, "sentences")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        images = self._load_image(index)
        if len(images) != 2:
            raise ValueError(f"Record {index}: `images` must hold exactly 2 images, got {len(images)}.")
        return {"images": images, "text": self.sentences[index], "label": self.labels[index]}


# --------------------------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------------------------


def _column(items: Sequence[dict[str, Any]], keys: Sequence[str], collator: str) -> list[Any]:
    """`item[key]` for every item, with the first of `keys` present; a clear error if none is."""
    if len(items) == 0:
        raise ValueError(f"{collator} got an empty batch.")
    key = next((k for k in keys if k in items[0]), None)
    if key is None:
        wanted = " or ".join(map(repr, keys))
        raise ValueError(f"{collator} expects items with a {wanted} field; got {sorted(items[0])}.")
    for index, item in enumerate(items):
        if key not in item:
            raise ValueError(f"{collator}: item {index} has no {key!r} field (fields: {sorted(item)}).")
    return [item[key] for item in items]


class ImageTextCollator:
    """
    Batches image-text items (retrieval, ITC + ITM).

    Returns `pixel_values` (B, 3, H, W) float, `input_ids` / `attention_mask` (B, L) long and
    `image_ids` (B,) long. Items without `text` (e.g. `ImageTextDataset.image_view()`) give only
    `pixel_values` and `image_ids`; items without `image` (`text_view()`) only the text tensors and `image_ids`.
    """

    def __init__(self, processor: Any, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        name = type(self).__name__
        if len(items) == 0:
            raise ValueError(f"{name} got an empty batch.")
        has_image, has_text = "image" in items[0], "text" in items[0] or "caption" in items[0]
        if not (has_image or has_text):
            raise ValueError(f"{name} expects items with 'image' and/or 'text' fields; got {sorted(items[0])}.")
        images = _column(items, ("image",), name) if has_image else None
        texts = _column(items, ("text", "caption"), name) if has_text else None
        batch = dict(self.processor(images=images, text=texts, max_length=self.max_length, return_tensors="pt"))
        batch["image_ids"] = torch.tensor(_column(items, ("image_id",), name), dtype=torch.long)
        return batch


class PretrainingCollator(ImageTextCollator):
    """
    `ImageTextCollator` plus masked-language-model inputs (X-VLM recipe).

    Per text, the number of masked tokens is `min(max_masks, max(1, round(n * mlm_probability)))` for its
    `n` maskable tokens (not special, not padding). With `whole_word_mask`, a word and its "##" pieces are
    masked together: shuffled words are added until that number is reached, skipping any word that would
    exceed `max_masks`, so a text has at most `max_masks` masked tokens. A masked token becomes [MASK]
    with probability 0.8, a random non-special token with 0.1, and stays unchanged with 0.1.

    Extra outputs: `mlm_input_ids` (B, L), the masked copy of `input_ids`, and `mlm_labels` (B, L), the
    original ids at masked positions and -100 elsewhere.

    Randomness comes from `generator` (a `torch.Generator`) or, if None, a generator seeded with `seed`,
    or, if both are None, torch's global RNG (which a `DataLoader` seeds per worker).
    """

    def __init__(
        self,
        processor: Any,
        mlm_probability: float = 0.25,
        max_masks: int = 8,
        whole_word_mask: bool = True,
        max_length: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ):
        super().__init__(processor, max_length)
        if not 0.0 < mlm_probability <= 1.0:
            raise ValueError(f"`mlm_probability` must be in (0, 1], got {mlm_probability}.")
        if max_masks < 1:
            raise ValueError(f"`max_masks` must be at least 1, got {max_masks}.")
        self.mlm_probability = mlm_probability
        self.max_masks = max_masks
        self.whole_word_mask = whole_word_mask
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator
        tokenizer = _tokenizer_of(processor)
        self.mask_token_id = tokenizer.mask_token_id
        self.special_ids = set(tokenizer.all_special_ids)
        self.random_candidates = torch.tensor([i for i in range(len(tokenizer)) if i not in self.special_ids])
        self.tokenizer = tokenizer

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(items)
        if "input_ids" not in batch:
            raise ValueError("PretrainingCollator needs items with text.")
        batch["mlm_input_ids"], batch["mlm_labels"] = self.mask_tokens(batch["input_ids"], batch["attention_mask"])
        return batch

    def mask_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks (B, L) `input_ids`; returns (mlm_input_ids, mlm_labels), both (B, L)."""
        masked = input_ids.clone()
        labels = torch.full_like(input_ids, -100)
        for row in range(input_ids.shape[0]):
            positions = self._choose_positions(input_ids[row].tolist(), attention_mask[row].tolist())
            if not positions:
                continue
            index = torch.tensor(positions)
            labels[row, index] = input_ids[row, index]
            draw = torch.rand(len(positions), generator=self.generator)
            to_mask, to_random = index[draw < 0.8], index[(draw >= 0.8) & (draw < 0.9)]
            masked[row, to_mask] = self.mask_token_id
            picks = torch.randint(len(self.random_candidates), (len(to_random),), generator=self.generator)
            masked[row, to_random] = self.random_candidates[picks]
        return masked, labels

    def _choose_positions(self, ids: list[int], mask: list[int]) -> list[int]:
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        words: list[list[int]] = []
        for position, (token_id, token, keep) in enumerate(zip(ids, tokens, mask)):
            if not keep or token_id in self.special_ids:
                continue
            # A "##" piece continues the previous word if that word ends right before it.
            if self.whole_word_mask and token.startswith("##") and words and words[-1][-1] == position - 1:
                words[-1].append(position)
            else:
                words.append([position])
        num_tokens = sum(len(word) for word in words)
        if num_tokens == 0:
            return []
        target = min(self.max_masks, max(1, round(num_tokens * self.mlm_probability)))
        chosen: list[int] = []
        for w in torch.randperm(len(words), generator=self.generator).tolist():
            if len(chosen) >= target:
                break
            if len(chosen) + len(words[w]) <= self.max_masks:
                chosen.extend(words[w])
        return sorted(chosen)


class CaptioningCollator:
    """
    Batches image-caption items for captioning (language-modelling loss on the caption only).

    The text is `prompt + caption`, tokenised as "[CLS] prompt caption [SEP]". Returns `pixel_values`
    (B, 3, H, W), `input_ids` / `attention_mask` (B, L) and `labels` (B, L): `input_ids` with -100 on
    [CLS], the prompt tokens and padding ([SEP] is kept as the end-of-caption target).
    """

    def __init__(self, processor: Any, prompt: str = "a picture of ", max_length: int | None = None):
        self.processor = processor
        self.prompt = prompt
        self.max_length = max_length
        self.prompt_ids: list[int] = _tokenizer_of(processor)(prompt, add_special_tokens=False)["input_ids"]
        limit = max_length or getattr(processor, "max_length", None)
        if limit is not None and limit <= len(self.prompt_ids) + 2:
            raise ValueError(
                f"max_length={limit} leaves no room for a caption after the {len(self.prompt_ids)}-token prompt."
            )

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        name = type(self).__name__
        images = _column(items, ("image",), name)
        texts = [self.prompt + caption for caption in _column(items, ("text", "caption"), name)]
        batch = dict(self.processor(images=images, text=texts, max_length=self.max_length, return_tensors="pt"))
        input_ids = batch["input_ids"]
        num_prefix = 1 + len(self.prompt_ids)  # [CLS] + prompt
        expected = torch.tensor(self.prompt_ids, dtype=input_ids.dtype)
        if not torch.equal(input_ids[:, 1:num_prefix], expected.expand(input_ids.shape[0], -1)):
            # Happens when the prompt's last word merges with the caption's first (no trailing space).
            raise ValueError(f"The prompt {self.prompt!r} does not tokenise to the same ids inside every text.")
        labels = input_ids.masked_fill(batch["attention_mask"] == 0, -100)
        labels[:, :num_prefix] = -100
        batch["labels"] = labels
        return batch


class VQACollator:
    """
    Batches VQA items.

    Returns `pixel_values` (B, 3, H, W), `input_ids` / `attention_mask` (B, L) for the questions, and the
    answers of the whole batch concatenated in item order: `answer_input_ids` / `answer_attention_mask`
    (N, La) tokenised as "[CLS] answer [SEP]", `answer_weights` (N,) float and `answer_counts` (B,) long,
    the number of answers of each question (`answer_counts.sum() == N`; N may be 0 on a test split, then
    the answer tensors have shape (0, 0)).
    """

    def __init__(self, processor: Any, max_length: int | None = None, answer_max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length
        self.answer_max_length = answer_max_length

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        name = type(self).__name__
        images = _column(items, ("image",), name)
        questions = _column(items, ("question", "text"), name)
        answers = _column(items, ("answers",), name)
        weights = _column(items, ("answer_weights",), name)
        for index, (a, w) in enumerate(zip(answers, weights)):
            if len(a) != len(w):
                raise ValueError(f"{name}: item {index} has {len(a)} answers but {len(w)} answer weights.")
        batch = dict(self.processor(images=images, text=questions, max_length=self.max_length, return_tensors="pt"))
        flat = [answer for answer_list in answers for answer in answer_list]
        if flat:
            encoded = self.processor(text=flat, max_length=self.answer_max_length, return_tensors="pt")
            batch["answer_input_ids"], batch["answer_attention_mask"] = encoded["input_ids"], encoded["attention_mask"]
        else:
            batch["answer_input_ids"] = torch.zeros((0, 0), dtype=torch.long)
            batch["answer_attention_mask"] = torch.zeros((0, 0), dtype=torch.long)
        batch["answer_weights"] = torch.tensor([float(w) for ws in weights for w in ws], dtype=torch.float)
        batch["answer_counts"] = torch.tensor([len(a) for a in answers], dtype=torch.long)
        return batch


class NLVR2Collator:
    """
    Batches NLVR2 items: `pixel_values` (B, 2, 3, H, W), `input_ids` / `attention_mask` (B, L) and
    `labels` (B,) long (1 = the sentence is true of the pair).
    """

    def __init__(self, processor: Any, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        name = type(self).__name__
        pairs = [list(images) for images in _column(items, ("images",), name)]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"{name}: every item needs exactly 2 images; got {[len(p) for p in pairs]}.")
        texts = _column(items, ("text", "sentence"), name)
        batch = dict(self.processor(images=pairs, text=texts, max_length=self.max_length, return_tensors="pt"))
        batch["labels"] = torch.tensor(
            [_parse_label(label, index) for index, label in enumerate(_column(items, ("label", "labels"), name))],
            dtype=torch.long,
        )
        return batch


__all__ = [
    "CaptioningCollator",
    "ImageTextCollator",
    "ImageTextDataset",
    "NLVR2Collator",
    "NLVR2Dataset",
    "PretrainingCollator",
    "VQACollator",
    "VQADataset",
]
