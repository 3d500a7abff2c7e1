"""`efficientvlm evaluate`: a saved task model's metrics on a held-out split (VQA accuracy, NLVR2 accuracy,
recall@K, BLEU-4 / CIDEr)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainers.commands.common import (
    answer_list_field,
    check_not_mask_checkpoint,
    itm_score_field,
    parse_arguments,
)
from trainers.placement import resolve_placement
from trainers.tasks import TASKS, build_dataset, evaluate_task, load_whole_task_model
from trainers.training import (
    check_answer_list_task,
    check_text_limit,
    read_answer_list,
    saved_processor,
    warn_on_answer_coverage,
)


@dataclass
class EvaluateArguments:
    task: str = field(metadata={"help": f"One of {TASKS[1:]}."})
    model_name_or_path: str = field(metadata={"help": "Saved model folder (with its processor) or Hub id."})
    eval_file: str = field(metadata={"help": "X-VLM JSON file of evaluation records."})
    image_root: str | None = field(default=None, metadata={"help": "Folder the records' image paths start from."})
    answer_list: str | None = answer_list_field()
    k: int = field(
        default=128, metadata={"help": "VQA / retrieval: candidates re-ranked per query (retrieval: 0 = ITC alone)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Examples (retrieval, captioning: images) per forward."})
    itm_score: str = itm_score_field()
    xvlm_scoring: bool = field(
        default=False,
        metadata={
            "help": "VQA: score the k re-ranked answers as the official X-VLM / EfficientVLM code does (the first "
            "token's log-probability counted twice) instead of by their plain likelihood."
        },
    )
    caption_level_recall: bool = field(
        default=False,
        metadata={
            "help": "Retrieval: also report recall with identical captions counted as one (txt_r1_caption, ..., "
            "r_mean_caption): a text query hits if any image with that caption is retrieved."
        },
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Captioning: longest caption, in tokens after the prompt (default 20)."},
    )
    min_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Captioning: shortest caption, in tokens after the prompt (default 0)."},
    )
    num_beams: int | None = field(
        default=None,
        metadata={
            "help": "Captioning: beam search with this many beams (default 1: greedy). The official evaluation: "
            "--num_beams 3 --min_new_tokens 1 --max_new_tokens 16 (its max_length 20 and min_length 5 count the "
            "4-token prompt '[CLS] a picture of')."
        },
    )
    device: str = field(
        default="auto", metadata={"help": "Where the model runs: auto (the GPU if torch sees one), cpu, cuda, cuda:N."}
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Weights and activations: float32, bfloat16 (on CPUs with bfloat16 matmul units, such as Intel "
            "AMX, several times faster than float32) or float16 (CUDA only). Scores are ranked in float32."
        },
    )
    pack_cpu_weights: bool = field(
        default=False,
        metadata={
            "help": "On the CPU in float32: run the attention and FFN products from oneDNN-packed weights "
            "(`model.pack_cpu_weights()`; faster, one more copy of the weights in memory; the same scores to float32 "
            "rounding)."
        },
    )
    cpu_attention_kernel: bool = field(
        default=False,
        metadata={
            "help": "On the CPU in float32: run unmasked attention (the image's) on the CPU attention kernel "
            '(`attn_implementation="efficientvlm_cpu"`; built on first use, which needs a C++ compiler; SDPA '
            "if it cannot be built; the same scores to float32 rounding)."
        },
    )
    output_file: str | None = field(default=None, metadata={"help": "Write the metrics here as JSON."})
    predictions_file: str | None = field(
        default=None,
        metadata={
            "help": "Write one JSON record per item here (a JSON list): VQA question id, prediction, gold answers; "
            "NLVR2 prediction and label; retrieval gold and its rank per query; captioning caption and references."
        },
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Evaluates a saved task model on a JSON split and prints its metrics."""
    from modeling_efficientvlm.cpu_attention_efficientvlm import ATTN_IMPLEMENTATION

    (args,) = parse_arguments("evaluate", (EvaluateArguments,), argv, "Evaluate a task model.")
    if args.task not in TASKS[1:]:  # the registry's own error offers pretraining, which has no evaluation
        raise ValueError(f"--task {args.task!r}: evaluate scores one of {', '.join(TASKS[1:])}.")
    check_answer_list_task(args.answer_list, args.task)
    decoding = {
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.min_new_tokens,
        "num_beams": args.num_beams,
    }
    given = [f"--{name}" for name, value in decoding.items() if value is not None]
    if given and args.task != "captioning":
        raise ValueError(f"{' and '.join(given)} decode captions; the {args.task} task generates none.")
    check_not_mask_checkpoint(args.model_name_or_path, "--model_name_or_path")
    for output in (args.output_file, args.predictions_file):
        if output:  # made before the evaluation runs, not found missing after it
            Path(output).parent.mkdir(parents=True, exist_ok=True)
    device, dtype = resolve_placement(args.device, args.dtype)
    for flag in ("pack_cpu_weights", "cpu_attention_kernel"):
        if getattr(args, flag) and (device.type != "cpu" or dtype != torch.float32):
            raise ValueError(
                f"--{flag} is for float32 on the CPU; got --device {args.device!r} ({device.type}) and "
                f"--dtype {args.dtype!r}."
            )
    # Another task's checkpoint (pre-training into VQA, VQA into NLVR2) leaves the task head new: fine to
    # fine-tune, meaningless to score.
    model = load_whole_task_model(
        args.task,
        args.model_name_or_path,
        f"--task {args.task}: --model_name_or_path",
        f"which would be scored freshly initialised. Evaluate it with the task it was trained for, or fine-tune it "
        f"for {args.task} first.",
        dtype=dtype,
    )
    model = model.to(device)
    if args.pack_cpu_weights:
        model.pack_cpu_weights()
    if args.cpu_attention_kernel:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    processor = saved_processor(args.model_name_or_path, "--model_name_or_path")
    positions = model.config.text_config.max_position_embeddings
    check_text_limit(processor, positions, flag=None, processor_folder=args.model_name_or_path)
    dataset = build_dataset(args.task, args.eval_file, args.image_root, processor)
    answer_list = read_answer_list(args.answer_list)
    if args.task == "vqa" and (answer_list or model.config.answer_candidates):
        source = f"--answer_list {args.answer_list}" if answer_list else f"saved with {args.model_name_or_path}"
        warn_on_answer_coverage(dataset, answer_list or model.config.answer_candidates, source, args.eval_file)
    result = evaluate_task(
        args.task,
        model,
        dataset,
        processor,
        batch_size=args.batch_size,
        answer_list=answer_list,
        k=args.k,
        caption_level_recall=args.caption_level_recall,
        itm_score=args.itm_score,
        xvlm_scoring=args.xvlm_scoring,
        **{name: value for name, value in decoding.items() if value is not None},
    )
    metrics = result.metrics
    print(json.dumps(metrics, indent=2))
    if not metrics:
        print(f"{args.eval_file} has no answers to score against: predictions only (--predictions_file).")
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(metrics, indent=2))
    if args.predictions_file:
        Path(args.predictions_file).write_text(json.dumps(result.items, indent=1))
    return metrics


if __name__ == "__main__":
    main()
