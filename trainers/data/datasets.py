"""
Datasets and collators for the X-VLM data formats (image-text, VQA, NLVR2).

Datasets read either an X-VLM JSON file (a list of records; image paths relative to `image_root`), an
in-memory list of such records, or a `datasets.Dataset` whose image column is an `Image` feature (or a
list of them) or a string path. Items are raw: RGB PIL images and strings. The collators do all
tokenisation, image processing and batching (`trainers.data.collators`).

Records (fields) -> items (keys):
- `ImageTextDataset`: image, caption (str or list of str), optional image_id -> image, text, image_id.
- `PretrainingDataset`: those, plus optional regions ([{caption, bbox: [x, y, w, h] pixels}], X-VLM's elems / bb)
  -> one more item per region caption: image, text, image_id, bbox (normalised center x, center y, w, h).
- `VQADataset`: image, question, answer (list, repeats allowed), optional answer_weight and question_id
  -> image, question, answers (unique), answer_weights, question_id.
- `NLVR2Dataset`: images ([left, right]), sentence, label (bool, "True"/"False" or 0/1) -> images, text, label.

Input checks, at construction unless noted; errors name the record ("Record 3 in train.json") and the field:
invalid JSON (file, line, column; a UTF-8 byte-order mark is fine), no records, values of the wrong type
(nothing is converted silently: an answer 2 must be written "2"), missing image files; when an item is read,
unreadable images and PIL's decompression-bomb error (with how to raise `PIL.Image.MAX_IMAGE_PIXELS`).
16-bit grayscale images are scaled to 8 bits (value >> 8) instead of clipping to white (see `_to_rgb`).
"""

from __future__ import annotations

import abc
import io
import math
import os
import warnings
from collections import Counter
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import datasets
import PIL.Image
import PIL.ImageOps
from torch.utils.data import Dataset

from modeling_efficientvlm.image_processing_efficientvlm import pil_to_8_bits
from trainers.json_files import read_json_file

DataSource = str | os.PathLike | Sequence[dict[str, Any]] | datasets.Dataset

EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how a photo's stored pixels turn to be upright


# --------------------------------------------------------------------------------------------------------------
# Reading records and images
# --------------------------------------------------------------------------------------------------------------


def _is_image_feature(feature: Any) -> bool:
    """True for a `datasets.Image` feature or a list/sequence of them."""
    return isinstance(feature, datasets.Image) or isinstance(getattr(feature, "feature", None), datasets.Image)


def _open_image(value: Any, where: str, image_root: Path | None) -> PIL.Image.Image:
    """Loads one image (PIL image, path, or `{"bytes", "path"}` dict) as RGB; errors start with `where` (the
    record, e.g. "Record 3 in train.json")."""
    if isinstance(value, PIL.Image.Image):
        return _to_rgb(value, where, "")
    if value is None:
        raise ValueError(f"{where}: the image is missing (None).")
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
        raise ValueError(f"{where}: unsupported image value of type {type(value).__name__}.")
    if isinstance(source, Path) and not source.is_file():
        raise FileNotFoundError(f"{where}: image file {shown} not found.")
    try:
        with PIL.Image.open(source) as image:
            # Upright as a viewer shows it (a phone photo's EXIF orientation), as `datasets` and transformers'
            # `load_image` (the pipelines' reader) read files; `exif_transpose` copies, so only when it turns.
            if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                image = PIL.ImageOps.exif_transpose(image)
            return _to_rgb(image, where, f" {shown}")  # converting loads the pixels, so the file can close
    except PIL.Image.DecompressionBombError as error:
        raise _bomb_error(error, where, f" {shown}") from error
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{where}: cannot read image {shown}: {error}") from error


def _bomb_error(error: Exception, where: str, shown: str) -> PIL.Image.DecompressionBombError:
    """PIL's decompression-bomb error with the record and a hint (same type, so callers catching it still do)."""
    return PIL.Image.DecompressionBombError(
        f"{where}: image{shown} is too large to open safely: {error} If you trust this image, raise Pillow's "
        "limit before the images are read: `PIL.Image.MAX_IMAGE_PIXELS = <pixels>` (or None for no limit)."
    )


def _to_rgb(image: PIL.Image.Image, where: str, shown: str) -> PIL.Image.Image:
    """`image` as 8-bit RGB, 16-bit and float images scaled as the image processor scales them
    ([`pil_to_8_bits`]); a range that cannot be understood raises naming the record."""
    return pil_to_8_bits(image, f"{where}: image{shown}").convert("RGB")


def _resolve(path: str | os.PathLike, image_root: Path | None) -> Path:
    path = Path(path)
    return path if image_root is None or path.is_absolute() else image_root / path


class _RecordDataset(Dataset, abc.ABC):
    """
    Shared reading logic: `self.records` holds the non-image fields of every record (image paths included
    when they are strings); decoded `datasets.Image` columns are read lazily from `self.hf_dataset`.

    Errors about a record name it as "Record {index}", followed by " in {file}" when the data came from a
    JSON file (`self.source`).
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
        self.source: str | None = None  # the JSON file (or `datasets` folder) the records came from
        if isinstance(data, datasets.Dataset):
            if self.image_column not in data.column_names:
                raise ValueError(f"The dataset has no `{self.image_column}` column (columns: {data.column_names}).")
            self.hf_dataset = data
            # A dataset read from disk names its folder in errors, as a JSON file names itself.
            files = [entry.get("filename") for entry in data.cache_files if entry.get("filename")]
            self.source = str(Path(files[0]).parent) if files else None
            self.lazy_image_column = _is_image_feature(data.features[self.image_column])
            # Read only the text-like columns now: decoding every image up front would be slow.
            columns = [c for c in data.column_names if not (self.lazy_image_column and c == self.image_column)]
            self.records = data.select_columns(columns).to_list()
            empty = "The `datasets.Dataset` has no records (0 rows)"
        elif isinstance(data, (str, os.PathLike)):
            self.source = str(data)
            self.records = _read_json_records(data)
            empty = f"{data} has no records (an empty JSON list)"
        elif isinstance(data, Sequence) and not isinstance(data, (bytes, bytearray)):
            self.records = list(data)
            empty = "The list of records has no records (it is empty)"
        else:
            raise ValueError(f"Unsupported data source of type {type(data).__name__}.")
        if not self.records:
            raise ValueError(f"{empty}; a {type(self).__name__} needs at least one.")
        for index, record in enumerate(self.records):
            if not isinstance(record, dict):
                raise ValueError(f"{self._where(index)} is a {type(record).__name__}, expected a dict.")
            if not self.lazy_image_column:
                if self.image_column not in record:
                    raise ValueError(
                        f"{self._where(index)} has no `{self.image_column}` field (fields: {sorted(record)})."
                    )
                for value in self._image_values(index):
                    if not isinstance(value, (str, os.PathLike, dict, PIL.Image.Image)) and value is not None:
                        raise ValueError(
                            f"{self._where(index)}: `{self.image_column}` must be an image path (a string), got "
                            f"{_describe(value)}."
                        )
        if check_files and not self.lazy_image_column:
            self._check_files()
        self.num_truncated = _report_long_texts(processor, self._parse_records(), max_length, self.text_kind)

    def _where(self, index: int) -> str:
        """How errors name record `index`: "Record 3", or "Record 3 in data/train.json" for a JSON file."""
        return f"Record {index}" if self.source is None else f"Record {index} in {self.source}"

    def _warn_records(self, indices: list[int], problem: str, why: str, of_all: bool = False, hint: str = "") -> None:
        """One warning counting the records at `indices` (out of all of them with `of_all`) that have `problem`
        ("have an empty caption"), naming the first ten (then `hint`), and `why` it matters."""
        if not indices:
            return
        shown = ", ".join(map(str, indices[:10])) + (", ..." if len(indices) > 10 else "")
        warnings.warn(
            f"{len(indices)}{f' of {len(self.records)}' if of_all else ''} record(s)"
            f"{'' if self.source is None else ' in ' + self.source} {problem} (records {shown}{hint}): {why}",
            UserWarning,
            stacklevel=4,
        )

    @abc.abstractmethod
    def _parse_records(self) -> list[str]:
        """Validates `self.records` and fills the dataset's fields; returns the texts the collator tokenises."""

    def _image_values(self, index: int) -> list[Any]:
        value = self.records[index][self.image_column]
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def _check_files(self) -> None:
        for index in range(len(self.records)):
            for value in self._image_values(index):
                if value is None:
                    raise ValueError(f"{self._where(index)}: the image is missing (null).")
                if isinstance(value, (str, os.PathLike)) and not _resolve(value, self.image_root).is_file():
                    where = (
                        f"image_root={self.image_root}"
                        if self.image_root is not None
                        else f"no image root: the path is read from the working directory, {os.getcwd()}; give "
                        "--image_root the folder the records' image paths start from"
                    )
                    raise FileNotFoundError(
                        f"{self._where(index)}: image file {_resolve(value, self.image_root)} not found ({where})."
                    )

    def check_image_headers(self) -> None:
        """Raises, naming the record, for an image file PIL cannot identify (reads each file's header only, not its
        pixels: cheap enough before training, so that a bad file does not surface after it or hours into it).
        Images stored in the dataset itself are decoded only when read."""
        if self.lazy_image_column:
            return
        seen: set[Path] = set()
        for index in range(len(self.records)):
            for value in self._image_values(index):
                if not isinstance(value, (str, os.PathLike)):
                    continue
                path = _resolve(value, self.image_root)
                if path in seen:
                    continue
                seen.add(path)
                try:
                    with PIL.Image.open(path):
                        pass
                except PIL.Image.DecompressionBombError as error:
                    raise _bomb_error(error, self._where(index), f" {path}") from error
                except (PIL.UnidentifiedImageError, OSError) as error:
                    raise ValueError(f"{self._where(index)}: cannot read image {path}: {error}") from error

    def _load_image(self, index: int) -> Any:
        """The record's image, or list of images, as RGB PIL."""
        where = self._where(index)
        if self.lazy_image_column:
            try:
                value = self.hf_dataset[index][self.image_column]  # `datasets` decodes the image here
            except PIL.Image.DecompressionBombError as error:
                raise _bomb_error(error, where, "") from error
            except (PIL.UnidentifiedImageError, OSError) as error:
                raise ValueError(f"{where}: cannot read its `{self.image_column}` image: {error}") from error
        else:
            value = self.records[index][self.image_column]
        if isinstance(value, (list, tuple)):
            return [_open_image(v, where, self.image_root) for v in value]
        return _open_image(value, where, self.image_root)


def _read_json_records(path: str | os.PathLike) -> list[Any]:
    """The list of records in an X-VLM JSON file (UTF-8, a leading byte-order mark allowed)."""
    records = read_json_file(
        path,
        str(path),
        "a JSON list of records",
        folder_hint="; a `datasets` folder saved with save_to_disk loads with `datasets.load_from_disk`, or the "
        "training commands' --dataset_path",
    )
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}.")
    return records


def _describe(value: Any) -> str:
    """`value`'s type and (shortened) repr, for error messages."""
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 60 else shown[:57] + '...'}"


def _text_field(record: dict[str, Any], names: Sequence[str], where: str) -> tuple[str, Any]:
    """(name, value) of the first of the fields `names` present and not None in `record`."""
    for name in names:
        if name in record and record[name] is not None:
            return name, record[name]
    nulls = [f"`{name}`" for name in names if name in record]  # present, so null (JSON `null`)
    if nulls:
        raise ValueError(f"{where}: {' and '.join(nulls)} {'is' if len(nulls) == 1 else 'are'} null; give a value.")
    raise ValueError(f"{where} has none of the fields {list(names)} (fields: {sorted(record)}).")


def _string_field(record: dict[str, Any], names: Sequence[str], where: str) -> str:
    """The first of the fields `names`, which must be a string."""
    name, value = _text_field(record, names, where)
    if not isinstance(value, str):
        raise ValueError(f"{where}: `{name}` must be a string, got {_describe(value)}.")
    return value


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
        negative_texts: the caption negative of every caption, or None. A record may give `negative_caption` (a
            string, or a list with one per caption): a text false of its image (e.g. its caption with one colour,
            shape, cell or count changed), used as an image-text matching negative (`itm_caption_negatives`).

    Items: `{"image": PIL.Image (RGB), "text": str, "image_id": int}`, and `"negative_text"` when the records
    have caption negatives.

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
        self._record_image: list[int] = []  # record index -> image id
        ids: dict[Any, int] = {}
        empty: list[int] = []  # records with an empty caption
        negatives: list[str] = []  # caption negatives, one per caption, when the records have them
        has_negatives = bool(self.records) and self.records[0].get("negative_caption") is not None
        for index, record in enumerate(self.records):
            where = self._where(index)
            name, captions = _text_field(record, ("caption", "text"), where)
            if isinstance(captions, str):
                captions = [captions]
            elif isinstance(captions, (list, tuple)) and captions:
                captions = list(captions)
            else:
                raise ValueError(
                    f"{where}: `{name}` must be a string or a non-empty list of strings, got {_describe(captions)}."
                )
            for position, caption in enumerate(captions):
                if not isinstance(caption, str):
                    raise ValueError(
                        f"{where}: `{name}` must be a string or a non-empty list of strings; item {position} is "
                        f"{_describe(caption)}."
                    )
            if any(not caption.strip() for caption in captions):
                empty.append(index)
            negatives += self._negative_captions(record, index, len(captions), has_negatives)
            key = self._image_key(record, index)
            if key not in ids:
                ids[key] = len(ids)
                self._image_record.append(index)
                self.image_to_texts.append([])
            image_id = ids[key]
            self._record_image.append(image_id)
            for caption in captions:
                self.image_to_texts[image_id].append(len(self.texts))
                self.text_to_image.append(image_id)
                self._text_record.append(index)
                self.texts.append(caption.strip())
        self._check_image_ids()
        self._warn_records(
            empty,
            "have an empty caption",
            "an empty text gives masked language modelling nothing to mask, retrieval an empty query, and "
            "captioning a target that ends at once (as a reference it is left out of BLEU / CIDEr).",
        )
        self.negative_texts: list[str] | None = negatives or None
        return self.texts

    def _negative_captions(self, record: dict[str, Any], index: int, count: int, expected: bool) -> list[str]:
        """The record's `negative_caption`s (a string, or a list with one per caption), checked: every record has
        them (`expected`, as the first record does) or none does."""
        where = self._where(index)
        value = record.get("negative_caption")
        if (value is not None) != expected:
            raise ValueError(
                f"{where}: {'has' if value is not None else 'lacks'} `negative_caption`, unlike the records before it "
                "(give every record its caption negatives, or none)."
            )
        if value is None:
            return []
        if isinstance(value, str) and count == 1:
            value = [value]
        if not isinstance(value, (list, tuple)) or len(value) != count or not all(isinstance(v, str) for v in value):
            shape = (
                "a string or a list of 1 string (the record has one caption)"
                if count == 1
                else f"a list of {count} strings, one per caption (a single string fits a record of one caption)"
            )
            raise ValueError(f"{where}: `negative_caption` must be {shape}; got {_describe(value)}.")
        return [v.strip() for v in value]

    def _image_key(self, record: dict[str, Any], index: int) -> Any:
        if record.get("image_id") is not None:
            if not isinstance(record["image_id"], Hashable):
                raise ValueError(
                    f"{self._where(index)}: `image_id` must be a string or a number, got "
                    f"{_describe(record['image_id'])}."
                )
            return ("id", record["image_id"])
        value = None if self.lazy_image_column else record.get(self.image_column)
        if isinstance(value, (str, os.PathLike)):
            return ("path", self._image_path(value))
        return ("row", index)

    def _image_path(self, value: str | os.PathLike) -> str:
        """The file an image path names, written one way: a relative (to `image_root`) and an absolute path, or one
        through `..`, of the same file are the same image (strings only: no file-system call per record)."""
        return os.path.abspath(_resolve(value, self.image_root))

    def _check_image_ids(self) -> None:
        """An `image_id` shared by records whose image files differ would keep the first file only (the others are
        never read, and their captions are scored against it): raises naming both records. A file under two ids is
        counted as two images (each the other's negative): warns."""
        files: dict[int, str] = {}
        ids_of_file: dict[str, set[int]] = {}
        for index, image_id in enumerate(self._record_image):
            value = self.records[index].get(self.image_column)
            if self.lazy_image_column or not isinstance(value, (str, os.PathLike)):
                continue
            path = self._image_path(value)
            first = files.setdefault(image_id, path)
            if first != path:
                record = self._image_record[image_id]
                raise ValueError(
                    f"{self._where(index)}: `image_id` {self.records[index]['image_id']!r} is also the id of record "
                    f"{record}, whose image is another file ({first}, here {path}); give every image its own id."
                )
            ids_of_file.setdefault(path, set()).add(image_id)
        shared = [path for path, ids in ids_of_file.items() if len(ids) > 1]
        if shared:
            ids = sorted(repr(self.records[self._image_record[i]].get("image_id")) for i in ids_of_file[shared[0]])
            warnings.warn(
                f"{len(shared)} image file(s){'' if self.source is None else ' in ' + self.source} appear under "
                f"several `image_id`s (first: {shared[0]}, ids {', '.join(ids)}; None: no id, the path): each id "
                "counts as an image of its own, so in retrieval and ITC / ITM the same picture is another's negative.",
                UserWarning,
                stacklevel=4,
            )

    @property
    def num_images(self) -> int:
        return len(self.image_to_texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {
            "image": self._load_image(self._text_record[index]),
            "text": self.texts[index],
            "image_id": self.text_to_image[index],
        }
        if self.negative_texts is not None:
            item["negative_text"] = self.negative_texts[index]
        return item

    def get_image(self, image_id: int) -> PIL.Image.Image:
        """The RGB image with id `image_id`."""
        return self._load_image(self._image_record[image_id])

    def image_record(self, image_id: int) -> dict[str, Any]:
        """The record that gave image `image_id` its id (the first of the records sharing it)."""
        return self.records[self._image_record[image_id]]

    def image_view(self) -> Dataset:
        """A dataset over distinct images (for retrieval): items `{"image", "image_id"}`, ordered by id."""
        return _ListDataset(self.num_images, lambda i: {"image": self.get_image(i), "image_id": i})

    def text_view(self) -> Dataset:
        """A dataset over captions without loading images: items `{"text", "image_id"}`."""
        return _ListDataset(len(self.texts), lambda t: {"text": self.texts[t], "image_id": self.text_to_image[t]})


REGION_FIELDS = ("regions", "elems")  # ours, X-VLM's
REGION_BOX_FIELDS = ("bbox", "bb")


class PretrainingDataset(ImageTextDataset):
    """
    `ImageTextDataset` plus X-VLM's region-text data: a record may list `regions` (X-VLM's `elems` is accepted
    too), each `{"caption": str or list of str, "bbox": [x, y, width, height]}` (`bb` accepted) in pixels of the
    record's image as it is read (upright: its EXIF orientation applied), (0, 0) its top-left corner. Every region
    caption is one more item after the captions, paired with the whole image and its box as the grounding target:
    pre-training regresses the box from the fused [CLS] (`EfficientVLMForPreTraining`'s `target_bbox`), so the model
    learns where in the image a text's object is. Boxes are checked when an item is read (they need the image's
    size): inside the image, positive size.

    Caption negatives (`negative_caption`, see `ImageTextDataset`) are for data without regions.

    Items: the caption items of `ImageTextDataset`, then `{"image", "text", "image_id", "bbox"}` per region
    caption, `bbox` the normalised (center x, center y, width, height) box. `texts` and `text_to_image` hold
    the captions only (retrieval over this data ranks captions, not region texts); `region_texts` the regions'.
    """

    def _parse_records(self) -> list[str]:
        texts = super()._parse_records()
        self.region_texts: list[str] = []
        self._regions: list[tuple[int, int, tuple[float, ...]]] = []  # (record, image id, raw box) per region text
        for index, record in enumerate(self.records):
            field = next((name for name in REGION_FIELDS if record.get(name) is not None), None)
            if field is None:
                continue
            where = f"{self._where(index)}: `{field}`"
            regions = record[field]
            if not isinstance(regions, (list, tuple)):
                raise ValueError(f"{where} must be a list of regions, got {_describe(regions)}.")
            image_id = self._record_image[index]
            for position, region in enumerate(regions):
                here = f"{where} item {position}"
                if not isinstance(region, dict):
                    raise ValueError(f"{here} must be a dict with `caption` and `bbox`, got {_describe(region)}.")
                name, captions = _text_field(region, ("caption", "text"), here)
                captions = [captions] if isinstance(captions, str) else captions
                if (
                    not isinstance(captions, (list, tuple))
                    or not captions
                    or not all(isinstance(c, str) and c.strip() for c in captions)
                ):
                    raise ValueError(
                        f"{here}: `{name}` must be a non-empty string or list of them, got {_describe(captions)}."
                    )
                box_name, box = _text_field(region, REGION_BOX_FIELDS, here)
                if (
                    not isinstance(box, (list, tuple))
                    or len(box) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
                    or not all(math.isfinite(v) for v in box)
                    or box[2] <= 0
                    or box[3] <= 0
                    or box[0] < 0
                    or box[1] < 0
                ):
                    raise ValueError(
                        f"{here}: `{box_name}` must be [x, y, width, height] in pixels (4 finite numbers, x and y "
                        f">= 0, width and height > 0), got {_describe(box)}."
                    )
                for caption in captions:
                    self.region_texts.append(caption.strip())
                    self._regions.append((index, image_id, tuple(float(v) for v in box)))
        if self.region_texts and self.negative_texts is not None:
            # A region text has no caption negative, and a batch mixes region and caption items.
            raise ValueError(
                f"{'These records' if self.source is None else self.source} give both `negative_caption`s and "
                "region texts: caption negatives are not supported with region data (drop one of the two)."
            )
        return texts + self.region_texts

    def __len__(self) -> int:
        return len(self.texts) + len(self.region_texts)

    def check_image_headers(self) -> None:
        """As [`ImageTextDataset.check_image_headers`], and every region box against the size of its upright image
        (read from the header too), so that a box past its image is named before training, not when a batch first
        reads it."""
        super().check_image_headers()
        if self.lazy_image_column:
            return
        sizes: dict[int, tuple[int, int]] = {}
        for record, _, box in self._regions:
            value = self._image_values(record)[0]
            if not isinstance(value, (str, os.PathLike)):
                continue  # an image given as such is checked when read
            if record not in sizes:
                with PIL.Image.open(_resolve(value, self.image_root)) as image:
                    width, height = image.size
                    if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # turned by a quarter: upright
                        width, height = height, width
                sizes[record] = (width, height)
            self._check_box(record, box, *sizes[record])

    def _check_box(self, record: int, box: tuple[float, ...], image_width: int, image_height: int) -> None:
        x, y, width, height = box
        if x + width > image_width * (1 + 1e-3) or y + height > image_height * (1 + 1e-3):
            raise ValueError(
                f"{self._where(record)}: region box [x, y, width, height] = {[x, y, width, height]} reaches past "
                f"its image ({image_width} x {image_height} pixels, upright); boxes are in pixels of the image as "
                "displayed."
            )

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < len(self.texts):
            return super().__getitem__(index)
        if index >= len(self):
            raise IndexError(index)
        region = index - len(self.texts)
        record, image_id, (x, y, width, height) = self._regions[region]
        image = self._load_image(record)
        image_width, image_height = image.size
        self._check_box(record, (x, y, width, height), image_width, image_height)
        box = (
            (x + width / 2) / image_width,
            (y + height / 2) / image_height,
            width / image_width,
            height / image_height,
        )
        return {"image": image, "text": self.region_texts[region], "image_id": image_id, "bbox": box}


class VQADataset(_RecordDataset):
    """
    Visual question answering; one item per question.

    `answer` is a list of annotator answers (repeats allowed) or a string; without `answer_weight` each
    unique answer weighs count / number of answers (X-VLM's rule); with `answer_weight` (one per answer)
    the weights of repeated answers are summed. A record without answers (a test split) gets empty lists.

    Attributes:
        references: the raw answer lists (repeats kept), as VQA accuracy needs them.
        unanswered: the indices of the questions without answers.

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
            where = self._where(index)
            self.questions.append(_string_field(record, ("question", "text"), where).strip())
            name = "answer" if record.get("answer") is not None else "answers"
            raw = _strings(record.get(name), name, where)
            blank = [position for position, answer in enumerate(raw) if not answer.strip()]
            if blank:
                raise ValueError(
                    f"{where}: `{name}` item {blank[0]} is empty; an empty answer would train the model to answer "
                    "nothing and score as a reference. Leave it out (a question without answers: no `answer`)."
                )
            weights = record.get("answer_weight")
            if weights is None:
                counts = Counter(raw)
                merged = {answer: count / len(raw) for answer, count in counts.items()}
            else:
                weights = _answer_weights(weights, where)
                if len(weights) != len(raw):
                    raise ValueError(
                        f"{where}: {len(weights)} answer weights for {len(raw)} answers; give one per answer."
                    )
                merged = {}
                for answer, weight in zip(raw, weights):
                    merged[answer] = merged.get(answer, 0.0) + weight
            self.references.append(raw)
            self.answers.append(list(merged))
            self.answer_weights.append(list(merged.values()))
        empty = [index for index, question in enumerate(self.questions) if not question]
        self._warn_records(empty, "have an empty question", "the answer can then only follow the image.")
        seen: set[Any] = set()
        repeated = []
        for index, record in enumerate(self.records):
            question_id = record.get("question_id")
            if isinstance(question_id, Hashable) and question_id is not None:
                if question_id in seen:
                    repeated.append(index)
                seen.add(question_id)
        self._warn_records(
            repeated,
            "repeat the `question_id` of an earlier record",
            "a predictions file (`--predictions_file`) keys its answers by question_id, so they cannot be told apart.",
        )
        self.unanswered = [index for index, answers in enumerate(self.references) if not answers]
        if len(self.unanswered) < len(self.references):  # all without: a test split, nothing to warn about
            self._warn_records(
                self.unanswered,
                "have no answers",
                "in training they add no loss, and VQA accuracy cannot score them.",
                of_all=True,
                hint="; a misspelt `answer` key?",
            )
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


def _strings(value: Any, name: str, where: str) -> list[str]:
    """A field that holds a string or a list of strings (VQA answers, any text of a record) as a list of strings;
    none is an empty list (a test split's answers). Errors name `where`, the field and the offending item."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: `{name}` must be a string or a list of strings, got {_describe(value)}.")
    for position, answer in enumerate(value):
        if not isinstance(answer, str):
            raise ValueError(
                f"{where}: `{name}` must be a string or a list of strings; item {position} is {_describe(answer)} "
                '(write numbers as strings, e.g. "2").'
            )
    return list(value)


def _answer_weights(value: Any, where: str) -> list[float]:
    """A VQA record's `answer_weight` (one number per answer, or one number for a single answer) as floats."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for position, weight in enumerate(values):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"{where}: `answer_weight` must be a finite number >= 0 or a list of them (a negative weight would "
                "push the model away from its answer); "
                f"{'item ' + str(position) if isinstance(value, (list, tuple)) else 'it'} is {_describe(weight)}."
            )
    return [float(weight) for weight in values]


def _parse_label(value: Any, where: str) -> int:
    """NLVR2 label to 0/1: accepts bools, "True"/"False" (any case) and 0/1."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    if isinstance(value, int) and value in (0, 1):
        return value
    raise ValueError(f"{where}: label {value!r} is not a boolean, 'True'/'False' or 0/1.")


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
            where = self._where(index)
            if not self.lazy_image_column and len(self._image_values(index)) != 2:
                raise ValueError(f"{where}: `images` must hold exactly 2 images.")
            self.sentences.append(_string_field(record, ("sentence", "text"), where).strip())
            self.labels.append(_parse_label(_text_field(record, ("label",), where)[1], where))
        empty = [index for index, sentence in enumerate(self.sentences) if not sentence]
        self._warn_records(empty, "have an empty sentence", "there is nothing for the pair to be true or false of.")
        return self.sentences

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        images = self._load_image(index)
        if len(images) != 2:
            raise ValueError(f"{self._where(index)}: `images` must hold exactly 2 images, got {len(images)}.")
        return {"images": images, "text": self.sentences[index], "label": self.labels[index]}
