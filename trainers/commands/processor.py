"""`efficientvlm processor`: the processor (image processor + BERT WordPiece tokenizer) for your own data.

    efficientvlm processor --train_files pretrain.json vqa_train.json --vocab_size 8000 --output_dir my_processor
    efficientvlm processor --tokenizer bert-base-uncased --output_dir my_processor

Either trains a lowercasing WordPiece vocabulary (the `tokenizers` library) on the texts of X-VLM JSON files
(captions, questions, answers, NLVR2 sentences), or takes an existing BERT WordPiece tokenizer (a folder, a Hub
id or a `vocab.txt`); writes an `EfficientVLMProcessor` to `--output_dir`. Give that folder to the training
commands with `--processor_name_or_path`: a model built from a preset then takes its `vocab_size` and special-token
ids from the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers.commands.common import parse_arguments


@dataclass
class ProcessorArguments:
    output_dir: str = field(metadata={"help": "Folder to write the processor (and its tokenizer files) to."})
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "An existing BERT WordPiece tokenizer: a folder, Hub id or vocab.txt (or --train_files)."},
    )
    train_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "X-VLM JSON files whose texts (caption, question, answer, sentence) train a WordPiece vocabulary.",
            "nargs": "+",
        },
    )
    vocab_size: int = field(default=8000, metadata={"help": "Largest vocabulary trained (special tokens included)."})
    min_frequency: int = field(default=2, metadata={"help": "Fewest occurrences of a merged piece in the texts."})
    image_size: int = field(default=224, metadata={"help": "Side of the square images the models take."})
    max_text_length: int = field(default=40, metadata={"help": "Longest text in tokens, [CLS] and [SEP] included."})


def main(argv: list[str] | None = None) -> Any:
    """Builds the processor, saves it to `--output_dir` and returns it."""
    from trainers.data.vocabulary import (
        load_bert_tokenizer,
        processor_with_tokenizer,
        texts_from_files,
        train_wordpiece_tokenizer,
    )

    (args,) = parse_arguments(
        "processor",
        (ProcessorArguments,),
        argv,
        "Write a processor for your own data: train a WordPiece vocabulary on X-VLM JSON files (--train_files) "
        "or take an existing BERT tokenizer (--tokenizer).",
    )
    held = [
        name
        for name in ("config.json", "model.safetensors", "model.safetensors.index.json")
        if (Path(args.output_dir) / name).is_file()
    ]
    if held:
        raise ValueError(
            f"--output_dir {args.output_dir} holds a model ({', '.join(held)}): a new processor there would replace "
            "the tokenizer the model was trained with, and its token ids would no longer match. Write the processor "
            "to a folder of its own."
        )
    if (args.tokenizer is None) == (not args.train_files):
        raise ValueError("Give exactly one of --tokenizer and --train_files.")
    if args.max_text_length < 2:
        raise ValueError(f"--max_text_length must be at least 2 ([CLS] and [SEP]); got {args.max_text_length}.")
    if args.tokenizer is not None:
        tokenizer = load_bert_tokenizer(args.tokenizer, args.max_text_length)
        source = f"tokenizer {args.tokenizer}"
    else:
        texts = texts_from_files(args.train_files)
        tokenizer = train_wordpiece_tokenizer(texts, args.vocab_size, args.min_frequency, args.max_text_length)
        source = f"WordPiece trained on {len(texts)} texts of {len(args.train_files)} file(s)"
    processor = processor_with_tokenizer(tokenizer, args.image_size, args.max_text_length)
    processor.save_pretrained(args.output_dir)
    print(
        f"{args.output_dir}: {source}, {len(tokenizer)} tokens, images {args.image_size}x{args.image_size}, "
        f"texts up to {args.max_text_length} tokens"
    )
    return processor


if __name__ == "__main__":
    main()
