"""
Collators: batches of raw dataset items -> dicts of tensors with the names the models read. All tokenisation
and image processing goes through an `EfficientVLMProcessor`.

Collators (output keys):
- `ImageTextCollator`: pixel_values, input_ids, attention_mask, image_ids.
- `PretrainingCollator`: the above + mlm_input_ids, mlm_labels.
- `CaptioningCollator`: pixel_values, input_ids, attention_mask, labels.
- `VQACollator`: pixel_values, input_ids, attention_mask, answer_input_ids, answer_attention_mask,
  answer_weights, answer_counts.
- `NLVR2Collator`: pixel_values (B, 2, 3, H, W), input_ids, attention_mask, labels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from .datasets import _parse_label, _tokenizer_of


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
    Items with a `negative_text` (a caption negative, see `ImageTextDataset`) add `itm_negative_input_ids` /
    `itm_negative_attention_mask` (B, L), padded to the texts' length.
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
        negatives = _column(items, ("negative_text",), name) if has_text and "negative_text" in items[0] else None
        if negatives is None:
            batch = dict(self.processor(images=images, text=texts, max_length=self.max_length, return_tensors="pt"))
        else:  # tokenized with the texts, so both have the same padded length
            batch = dict(self.processor(images=images, return_tensors="pt")) if images is not None else {}
            both = self.processor(text=texts + negatives, max_length=self.max_length, return_tensors="pt")
            count = len(items)
            batch["input_ids"], batch["itm_negative_input_ids"] = both["input_ids"][:count], both["input_ids"][count:]
            batch["attention_mask"] = both["attention_mask"][:count]
            batch["itm_negative_attention_mask"] = both["attention_mask"][count:]
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
    original ids at masked positions and -100 elsewhere; when items carry a region `bbox` (`PretrainingDataset`),
    `target_bbox` (B, 4) and `target_bbox_mask` (B,) for grounding (see [`grounding_targets`]).

    Randomness is drawn per sample, never from torch's global RNG: each text's masks come from its own
    `torch.Generator`, seeded with a stable hash (BLAKE2b) of `(seed, epoch, image id, text)` (`seed` defaults
    to 0; `trainers.training.train` passes `--seed`; `epoch` is set with [`set_epoch`], which the callback of
    `trainers.data.epochs` calls at the start of each epoch). A sample therefore gets the same masks whatever the
    batch it lands in, the world size, the number of data workers, or a kill and resume; and new masks each
    epoch. (Two identical (image id, text) items of one epoch get the same masks.) Passing `generator` instead
    draws every batch from that one stream, in call order (the former behaviour; not reproducible under resume or
    another world size).
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
        self.generator = generator
        self.seed = 0 if seed is None else int(seed)
        # In shared memory: data workers hold their own copy of the collator (persistent ones for the whole run),
        # and this one tensor is theirs too, so `set_epoch` here reaches them.
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()
        tokenizer = _tokenizer_of(processor)
        self.mask_token_id = tokenizer.mask_token_id
        self.special_ids = set(tokenizer.all_special_ids)
        self.random_candidates = torch.tensor([i for i in range(len(tokenizer)) if i not in self.special_ids])
        self.tokenizer = tokenizer

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(items)
        if "input_ids" not in batch:
            raise ValueError("PretrainingCollator needs items with text.")
        generators = None
        if self.generator is None:
            generators = [
                self.sample_generator(image_id, item.get("text", item.get("caption")))
                for image_id, item in zip(batch["image_ids"].tolist(), items)
            ]
        batch["mlm_input_ids"], batch["mlm_labels"] = self.mask_tokens(
            batch["input_ids"], batch["attention_mask"], generators
        )
        if any("bbox" in item for item in items):
            batch["target_bbox"], batch["target_bbox_mask"] = self.grounding_targets(items)
        if not (batch["mlm_labels"] != -100).any():
            # The MLM cross-entropy would average over no targets: NaN, summed into the loss.
            texts = [item.get("text", item.get("caption")) for item in items]
            shown = ", ".join(repr(t) for t in texts[:8]) + (", ..." if len(texts) > 8 else "")
            raise ValueError(
                f"PretrainingCollator: no text in this batch of {len(items)} has a token to mask (empty captions, or "
                f"only special / unknown tokens after tokenisation), so the MLM loss would be NaN. Image ids "
                f"{batch['image_ids'].tolist()}, texts: {shown}. Remove or fix these captions."
            )
        return batch

    def grounding_targets(self, items: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """`target_bbox` (B, 4): each region item's normalised (cx, cy, w, h) box, zeros for the caption items;
        `target_bbox_mask` (B,) bool: which rows have a box."""
        image_processor = getattr(self.processor, "image_processor", None)
        if getattr(image_processor, "do_center_crop", False):
            raise ValueError(
                "Region boxes (`bbox`) are relative to the whole image, but the image processor center-crops "
                "(`do_center_crop=True`), which would move them: set `do_center_crop=False` for pre-training with "
                "regions."
            )
        has_box = [item.get("bbox") is not None for item in items]
        boxes = [item["bbox"] if box else (0.0, 0.0, 0.0, 0.0) for item, box in zip(items, has_box)]
        return torch.tensor(boxes, dtype=torch.float32), torch.tensor(has_box, dtype=torch.bool)

    @property
    def epoch(self) -> int:
        """The epoch that seeds the per-sample masks (see the class docstring)."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that seeds the per-sample masks, in this collator and the copies of it that data workers
        hold (those of `--dataloader_persistent_workers` too): call it before the epoch's data loader is iterated."""
        self._epoch.fill_(int(epoch))

    def sample_generator(self, image_id: Any, text: Any) -> torch.Generator:
        """The generator of one sample's masks: seeded with a hash of (seed, epoch, image id, text)."""
        key = f"{self.seed}\0{self.epoch}\0{image_id}\0{text}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))

    def mask_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generators: Sequence[torch.Generator] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks (B, L) `input_ids`; returns (mlm_input_ids, mlm_labels), both (B, L). Row `i` draws from
        `generators[i]` (default: `self.generator` for every row)."""
        masked = input_ids.clone()
        labels = torch.full_like(input_ids, -100)
        for row in range(input_ids.shape[0]):
            generator = self.generator if generators is None else generators[row]
            positions = self._choose_positions(input_ids[row].tolist(), attention_mask[row].tolist(), generator)
            if not positions:
                continue
            index = torch.tensor(positions)
            labels[row, index] = input_ids[row, index]
            draw = torch.rand(len(positions), generator=generator)
            to_mask, to_random = index[draw < 0.8], index[(draw >= 0.8) & (draw < 0.9)]
            masked[row, to_mask] = self.mask_token_id
            picks = torch.randint(len(self.random_candidates), (len(to_random),), generator=generator)
            masked[row, to_random] = self.random_candidates[picks]
        return masked, labels

    def _choose_positions(self, ids: list[int], mask: list[int], generator: torch.Generator | None) -> list[int]:
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
        for w in torch.randperm(len(words), generator=generator).tolist():
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
    the number of answers of each question (`answer_counts.sum() == N`).

    Items without answers (a test split) contribute no answers: in training, the model's loss sums the
    weighted answer losses of the batch and divides by the number of questions B, so a question without
    answers adds nothing to the sum but still counts in B. A batch in which no item has answers cannot be
    trained on and raises a ValueError, unless `require_answers=False` (batches for inference), which gives
    answer tensors of shape (0, 0).
    """

    def __init__(
        self,
        processor: Any,
        max_length: int | None = None,
        answer_max_length: int | None = None,
        require_answers: bool = True,
    ):
        self.processor = processor
        self.max_length = max_length
        self.answer_max_length = answer_max_length
        self.require_answers = require_answers

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        name = type(self).__name__
        images = _column(items, ("image",), name)
        questions = _column(items, ("question", "text"), name)
        answers = _column(items, ("answers",), name)
        weights = _column(items, ("answer_weights",), name)
        for index, (a, w) in enumerate(zip(answers, weights)):
            if len(a) != len(w):
                raise ValueError(f"{name}: item {index} has {len(a)} answers but {len(w)} answer weights.")
        if self.require_answers and not any(len(a) for a in answers):
            ids = [item.get("question_id") for item in items]
            raise ValueError(
                f"{name}: no record in this batch has answers; VQA training needs answers - is this a test "
                f"split? (question ids {ids}) Train on records with `answer` lists, or pass "
                "`require_answers=False` to batch questions without answers for inference."
            )
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
            [
                _parse_label(label, f"{name}: item {index}")
                for index, label in enumerate(_column(items, ("label", "labels"), name))
            ],
            dtype=torch.long,
        )
        return batch
