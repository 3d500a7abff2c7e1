"""`efficientvlm convert`: an official X-VLM / EfficientVLM `.pth` checkpoint -> a complete model folder.

    efficientvlm convert --checkpoint vqa_pruning_stage.pth --task vqa --vocab_file bert-base-uncased-vocab.txt \
        --output_dir pruned_vqa

A pruning-stage checkpoint (one with `l0_module.*` log-alphas) is pruned with the official deterministic masks
and its `pruning_report.json` written beside it; any other checkpoint converts as it is. Official checkpoints
carry no tokenizer: give the processor (`--processor_name_or_path`) or the BERT WordPiece vocabulary the model
was trained with (`--vocab_file`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging

from trainers.commands.common import parse_arguments

logger = logging.get_logger(__name__)


@dataclass
class ConvertArguments:
    checkpoint: str = field(metadata={"help": "The official .pth file (a state dict, or a dict with `model`)."})
    task: str = field(metadata={"help": "pretraining, retrieval, captioning or vqa (pruning-stage too)."})
    output_dir: str = field(metadata={"help": "Folder to write the model, its processor and its card to."})
    processor_name_or_path: str | None = field(default=None, metadata={"help": "A saved processor to ship."})
    vocab_file: str | None = field(default=None, metadata={"help": "Or a WordPiece vocab to build it from."})
    binary_masks: bool = field(
        default=True,
        metadata={
            "help": "Pruning-stage: survivors at 1 as the official evaluation does (--no_binary_masks / "
            "--binary_masks false: their mask values folded into the weights instead)."
        },
    )
    answer_list: str | None = field(
        default=None,
        metadata={
            "help": "VQA: JSON list file of the candidate answers to save with the model (the official checkpoints "
            "hold none; X-VLM ranks its answer_list.json), so rank_answers and the pipeline use them."
        },
    )


def main(argv: list[str] | None = None) -> dict:
    """Converts, writes the folder and returns its report (the pruning report, or the model's class)."""

    from modeling_efficientvlm.convert_efficientvlm_checkpoints import (
        model_from_official_state_dict,
        read_official_state_dict,
    )
    from trainers.model_card import ModelCardInfo
    from trainers.pruning.official import L0_PREFIX, prune_official_state_dict
    from trainers.saving import save_model_folder
    from trainers.training import (
        check_answer_list_task,
        check_image_size,
        check_text_limit,
        check_vocabulary,
        load_processor,
        read_answer_list,
    )

    (args,) = parse_arguments("convert", (ConvertArguments,), argv, "Convert an official checkpoint.")
    if args.processor_name_or_path is None and args.vocab_file is None:
        raise ValueError("Official checkpoints carry no tokenizer: give --processor_name_or_path or --vocab_file.")
    check_answer_list_task(args.answer_list, args.task)
    answers = read_answer_list(args.answer_list)  # read before converting: a bad file is named first
    state_dict = read_official_state_dict(args.checkpoint)
    try:
        if any(name.startswith(L0_PREFIX) for name in state_dict):
            model, report = prune_official_state_dict(state_dict, args.task, binary=args.binary_masks)
        else:
            model, report = model_from_official_state_dict(state_dict, args.task), None
    except ValueError as error:  # the conversion's errors name tensors and tasks; the file is named here
        raise ValueError(f"--checkpoint {args.checkpoint} (--task {args.task}): {error}") from error
    processor = load_processor(model.config, args.processor_name_or_path, args.vocab_file)
    # The checkpoint fixes the embedding table and the image size: a processor for others would fail at first use.
    given = "--vocab_file" if args.vocab_file is not None else "--processor_name_or_path"
    check_vocabulary(
        processor.tokenizer,
        model.config.text_config.vocab_size,
        f"--checkpoint {args.checkpoint}",
        fix=f"give the vocabulary the model was trained with ({given})",
    )
    tokens, rows = len(processor.tokenizer), model.config.text_config.vocab_size
    if tokens < rows:
        logger.warning(
            f"The tokenizer ({given}) has {tokens} tokens but the checkpoint's embedding table has {rows} rows: "
            "unless it is the vocabulary the checkpoint was trained with (X-VLM / EfficientVLM: BERT's uncased "
            f"vocabulary, 30522 tokens), every token id points at another word's embedding."
        )
    size = model.config.vision_config.image_size
    check_image_size(processor, size, fix=f"give a processor for {size}x{size} images, or --vocab_file to build one")
    positions = model.config.text_config.max_position_embeddings
    fix = f"give a processor whose max_length is at most {positions}, or --vocab_file to build one"
    check_text_limit(processor, positions, fix=fix, flag=None)
    card = ModelCardInfo(task=args.task, stage="convert", source_checkpoint=Path(args.checkpoint).name)
    if answers:
        try:
            model.set_answer_candidates(answers, processor.tokenizer)
        except ValueError as error:
            raise ValueError(f"--answer_list {args.answer_list}: {error}") from error
        card.answer_candidates, card.answer_candidates_source = len(answers), f"`--answer_list {args.answer_list}`"
    save_model_folder(model, processor, args.output_dir, card=card, pruning_report=report)
    summary = report or {"task": args.task, "model": type(model).__name__}
    print(json.dumps({key: summary[key] for key in ("task", "sparsity", "model") if key in summary}, indent=2))
    return summary


if __name__ == "__main__":
    main()
