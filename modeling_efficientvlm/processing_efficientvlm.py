"""EfficientVLM processor: the image processor and a BERT WordPiece tokenizer behind one call."""

from __future__ import annotations

import warnings
from typing import Any

from transformers import BatchFeature, ProcessorMixin


class EfficientVLMProcessor(ProcessorMixin):
    r"""
    Wraps an [`EfficientVLMImageProcessor`] and a `BertTokenizer` (the fast WordPiece tokenizer).

    `processor(images=..., text=...)` returns a `BatchFeature` with
    - `pixel_values`: (B, 3, H, W), or (B, K, 3, H, W) when `images` is a list of K-image groups
      (K = 2 for NLVR2 pairs);
    - `input_ids`, `attention_mask`: (B, L), "[CLS] text [SEP]", padded to the longest text of the batch
      and truncated to `max_length` tokens (special tokens included).

    Truncation is never silent: every call that truncates warns with the number of texts cut, and the
    totals are kept in `num_texts_seen` / `num_texts_truncated`.

    Args:
        image_processor: the image processor.
        tokenizer: a BERT WordPiece tokenizer.
        max_length: default longest text in tokens (X-VLM uses 40 for pre-training and retrieval).
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, max_length: int = 40, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, **kwargs)
        if max_length < 2:
            raise ValueError(f"`max_length` must be at least 2 ([CLS] and [SEP]), got {max_length}.")
        self.max_length = max_length
        self.num_texts_seen = 0
        self.num_texts_truncated = 0

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        padding: bool | str = "longest",
        truncation: bool = True,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """
        Args:
            images: one image, a list of images, or a list of equal-size image groups (PIL, numpy HWC, torch CHW).
            text: one string or a list of strings.
            padding: tokenizer padding strategy ("longest" by default; "max_length" pads to `max_length`).
            truncation: cut texts longer than `max_length` (with a warning). If False, a text longer than
                `max_length` raises a `ValueError`.
            max_length: overrides `self.max_length` for this call.
            return_tensors: "pt" (default), "np" or None.
            kwargs: image-processor options (e.g. `size`) go to the image processor, the rest to the tokenizer.
        """
        if images is None and text is None:
            raise ValueError("Give `images`, `text` or both.")
        image_kwarg_names = self.image_processor.valid_kwargs.__annotations__
        image_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in image_kwarg_names}
        max_length = max_length or self.max_length
        data: dict[str, Any] = {}
        if text is not None:
            data.update(self._tokenize(text, padding, truncation, max_length, return_tensors, **kwargs))
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors, **image_kwargs))
        if text is not None and images is not None:
            num_texts = 1 if isinstance(text, str) else len(text)
            if data["pixel_values"].shape[0] != num_texts:
                raise ValueError(
                    f"Got {data['pixel_values'].shape[0]} images (or image groups) but {num_texts} texts; "
                    "pass one text per image (group)."
                )
        return BatchFeature(data, tensor_type=return_tensors)

    def _tokenize(
        self,
        text: str | list[str],
        padding: bool | str,
        truncation: bool,
        max_length: int,
        return_tensors: str | None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("`text` must be a string or a list of strings.")
        if len(texts) == 0:
            raise ValueError("`text` is an empty list.")
        kwargs.setdefault("return_token_type_ids", False)
        # Positions are absolute (BERT): padding goes on the right even when a caller (the image-text-to-text
        # pipeline does, for decoder-only models) set the tokenizer's `padding_side` to "left".
        kwargs.setdefault("padding_side", "right")
        # Always truncate inside the tokenizer so the overflow is recorded per text; then report it.
        encoding = self.tokenizer(
            texts, padding=padding, truncation=True, max_length=max_length, return_tensors=return_tensors, **kwargs
        )
        truncated = [i for i, enc in enumerate(encoding.encodings or []) if enc.overflowing]
        self.num_texts_seen += len(texts)
        if truncated:
            if not truncation:
                raise ValueError(
                    f"{len(truncated)} of {len(texts)} texts are longer than max_length={max_length} tokens "
                    f"(first: index {truncated[0]}); pass truncation=True or a larger max_length."
                )
            self.num_texts_truncated += len(truncated)
            warnings.warn(
                f"{len(truncated)} of {len(texts)} texts were longer than max_length={max_length} tokens and were "
                "truncated (running totals: `num_texts_truncated` / `num_texts_seen`).",
                UserWarning,
                stacklevel=3,
            )
        return dict(encoding)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]


__all__ = ["EfficientVLMProcessor"]
