"""A processor for your own data: the texts of X-VLM JSON files, a BERT WordPiece vocabulary trained on them with
the `tokenizers` library, and the `EfficientVLMProcessor` (image processor + tokenizer) that `efficientvlm
processor` writes and every training command reads with `--processor_name_or_path`.

    texts = texts_from_files(["pretrain.json", "vqa_train.json"])
    processor = train_wordpiece_processor(texts, vocab_size=8000, image_size=224)
    processor.save_pretrained("my_processor")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from transformers.utils import logging

from trainers.data.datasets import REGION_FIELDS, _describe, _read_json_records, _strings

logger = logging.get_logger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# record field -> what it holds; a field may be a string or a list of strings (captions, answers)
TEXT_FIELDS = ("caption", "text", "negative_caption", "question", "answer", "answers", "sentence")


def record_texts(record: Any, where: str) -> Iterator[str]:
    """The texts of one X-VLM record: its captions (`caption` / `text`, a string or a list), caption negatives,
    `question`, answers (`answer` / `answers`, a string or a list), NLVR2 `sentence` and the captions of its
    `regions` (pre-training's region texts; their structure is checked by `PretrainingDataset`). A record that is a
    plain string (an answer list file) is its own text; errors name `where` and the field."""
    if isinstance(record, str):
        yield record
        return
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object (or a string), got {_describe(record)}.")
    for name in TEXT_FIELDS:
        yield from _strings(record.get(name), name, where)
    for name in REGION_FIELDS:  # pre-training's region texts (X-VLM's region-text data)
        regions = record.get(name) or []
        for position, region in enumerate(regions if isinstance(regions, list) else []):
            if isinstance(region, dict):
                for field in ("caption", "text"):
                    yield from _strings(region.get(field), field, f"{where}, `{name}` item {position}")


def texts_from_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Every non-empty text of the X-VLM JSON files `paths` (pre-training / retrieval / captioning captions, VQA
    questions and answers, NLVR2 sentences; an answer-list file, a JSON list of strings, counts too).
    A file without any text is an error naming it."""
    texts: list[str] = []
    for path in paths:
        found = 0
        for index, record in enumerate(_read_json_records(path)):
            for text in record_texts(record, f"{path}, record {index}"):
                if text.strip():
                    texts.append(text.strip())
                    found += 1
        if not found:
            raise ValueError(
                f"{path} holds no text: expected X-VLM records with `caption`, `question`, `answer` or `sentence`."
            )
    return texts


def train_wordpiece_tokenizer(
    texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2, model_max_length: int = 40
) -> Any:
    """A lowercasing BERT WordPiece tokenizer (transformers' fast `BertTokenizer`) whose vocabulary is trained on
    `texts` with the `tokenizers` library: the special tokens [PAD] [UNK] [CLS] [SEP] [MASK] first (ids 0-4),
    every character of the texts (alone and as a `##` continuation, whatever `min_frequency` says), then the most
    frequent merges up to `vocab_size` tokens. The characters are always kept, even past `vocab_size` (a
    warning says so)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer

    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"--vocab_size must be more than the {len(SPECIAL_TOKENS)} special tokens; got {vocab_size}.")
    if min_frequency < 1:
        raise ValueError(f"--min_frequency must be at least 1; got {min_frequency}.")
    texts = list(texts)
    if not texts:
        raise ValueError("No texts to train a vocabulary on.")

    def trained_vocabulary(size: int) -> dict[str, int]:
        # The same normalisation and pre-tokenisation as BertTokenizer(do_lower_case=True), so the trained pieces
        # are the ones the tokenizer looks up.
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            continuing_subword_prefix="##",
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return tokenizer.get_vocab()

    def missing_continuations(vocab: dict[str, int]) -> list[str]:
        # The trainer keeps a character's `##` continuation only where it was seen inside a word: without it, a
        # new word with that character after its first would become a whole [UNK].
        return [f"##{token}" for token in sorted(vocab) if len(token) == 1 and f"##{token}" not in vocab]

    vocab = trained_vocabulary(vocab_size)
    missing = missing_continuations(vocab)
    if len(vocab) + len(missing) > vocab_size:  # make room: fewer merges (the characters do not depend on them)
        vocab = trained_vocabulary(max(vocab_size - len(missing), len(SPECIAL_TOKENS) + 1))
        missing = missing_continuations(vocab)
    for token in missing:
        vocab[token] = len(vocab)
    if len(vocab) > vocab_size:
        characters = sum(len(token) == 1 for token in vocab)
        logger.warning(
            f"--vocab_size {vocab_size}: the texts' {characters} characters, alone and as ## continuations, make "
            f"{len(vocab)} tokens with the special tokens; every character is kept, so that no word of these "
            "characters becomes [UNK]."
        )
    bert = BertTokenizer(vocab=vocab, do_lower_case=True)
    bert.model_max_length = model_max_length
    bert.init_kwargs["model_max_length"] = model_max_length
    return bert


def load_bert_tokenizer(name_or_path: str | os.PathLike, model_max_length: int = 40) -> Any:
    """A BERT WordPiece tokenizer from a folder or Hub id (a saved tokenizer or processor), or from a `vocab.txt`
    file; it must have the BERT special tokens the models use."""
    from transformers import BertTokenizer

    text = str(name_or_path)
    if os.path.isfile(text):
        if text.endswith(".json"):
            raise ValueError(
                f"--tokenizer {text}: a JSON file is not a vocab.txt; give the folder holding it (a saved tokenizer) "
                "or a WordPiece vocab.txt (one token a line)."
            )
        tokenizer = BertTokenizer(vocab=text, do_lower_case=True)
    else:
        if not os.path.isdir(text) and (text.startswith(("/", ".", "~")) or text.count("/") > 1):
            raise FileNotFoundError(f"--tokenizer {text}: no such folder or file (a Hub id is 'name' or 'org/name').")
        tokenizer = BertTokenizer.from_pretrained(text)
    if len(tokenizer) <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"--tokenizer {text}: no vocabulary found there ({len(tokenizer)} tokens, the special ones at most): give "
            "a folder with a saved tokenizer, a Hub id, or a WordPiece vocab.txt."
        )
    missing = [name for name in ("pad", "unk", "cls", "sep", "mask") if getattr(tokenizer, f"{name}_token_id") is None]
    if missing:
        raise ValueError(
            f"--tokenizer {name_or_path}: no {', '.join(f'[{name.upper()}]' for name in missing)} token; a BERT "
            "WordPiece vocabulary with [PAD] [UNK] [CLS] [SEP] [MASK] is needed."
        )
    tokenizer.model_max_length = model_max_length
    tokenizer.init_kwargs["model_max_length"] = model_max_length
    return tokenizer


def processor_with_tokenizer(tokenizer: Any, image_size: int = 224, max_text_length: int = 40) -> Any:
    """An `EfficientVLMProcessor`: the image processor at `image_size` x `image_size` and `tokenizer`, texts cut
    at `max_text_length` tokens ([CLS] and [SEP] included)."""
    from modeling_efficientvlm import EfficientVLMImageProcessor, EfficientVLMProcessor

    if image_size < 1:
        raise ValueError(f"--image_size must be positive; got {image_size}.")
    tokenizer.model_max_length = max_text_length
    tokenizer.init_kwargs["model_max_length"] = max_text_length
    image_processor = EfficientVLMImageProcessor(size={"height": image_size, "width": image_size})
    return EfficientVLMProcessor(image_processor, tokenizer, max_length=max_text_length)


def train_wordpiece_processor(
    texts: Iterable[str],
    vocab_size: int = 8000,
    min_frequency: int = 2,
    image_size: int = 224,
    max_text_length: int = 40,
) -> Any:
    """An `EfficientVLMProcessor` whose WordPiece vocabulary is trained on `texts` (see
    [`train_wordpiece_tokenizer`])."""
    tokenizer = train_wordpiece_tokenizer(texts, vocab_size, min_frequency, max_text_length)
    return processor_with_tokenizer(tokenizer, image_size, max_text_length)


__all__ = [
    "SPECIAL_TOKENS",
    "load_bert_tokenizer",
    "processor_with_tokenizer",
    "record_texts",
    "texts_from_files",
    "train_wordpiece_processor",
    "train_wordpiece_tokenizer",
]
