"""`efficientvlm export`: a saved task model -> ONNX graphs of its inference path (dynamic batch and sequence
axes), checked against PyTorch right after export, optionally int8, with the latency of PyTorch, ONNX fp32 and (with
--int8) PyTorch int8 and ONNX int8 side by side and, given an evaluation file, the task metric of each.

    efficientvlm export --model_name_or_path pruned_vqa --output_dir pruned_vqa_onnx --int8 \\
        --eval_file vqa_val.json --image_root images
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from trainers.commands.common import answer_list_field, check_not_mask_checkpoint, itm_score_field, parse_arguments


@dataclass
class ExportArguments:
    model_name_or_path: str = field(metadata={"help": "Saved task model folder (retrieval, vqa, nlvr2, captioning)."})
    output_dir: str = field(metadata={"help": "Where the .onnx files, onnx_manifest.json and config.json go."})
    int8: bool = field(
        default=False, metadata={"help": "Also write <graph>.int8.onnx (onnxruntime dynamic quantization)."}
    )
    eval_file: str | None = field(
        default=None,
        metadata={"help": "X-VLM JSON file: print the task metric of PyTorch, ONNX fp32 (and int8) on it."},
    )
    image_root: str | None = field(default=None, metadata={"help": "Folder the eval records' image paths start from."})
    eval_batch_size: int = field(
        default=32, metadata={"help": "--eval_file: examples (retrieval, captioning: images) per forward."}
    )
    k: int = field(default=128, metadata={"help": "VQA / retrieval: candidates re-ranked per query."})
    itm_score: str = itm_score_field()
    answer_list: str | None = answer_list_field()
    benchmark_batch_size: int = field(default=8, metadata={"help": "Batch of the latency comparison (0: skip it)."})
    benchmark_text_length: int = field(default=30, metadata={"help": "Text length of the latency comparison."})
    repeats: int = field(default=10, metadata={"help": "Timed runs per graph and round."})
    rounds: int = field(default=2, metadata={"help": "Interleaved rounds over the backends."})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Exports, checks parity (raises on a mismatch), compares; prints and returns what it measured."""
    import torch
    from transformers import AutoModel
    from transformers.utils import logging

    import modeling_efficientvlm  # noqa: F401  (registers the Auto classes)
    from modeling_efficientvlm.modeling_efficientvlm_retrieval import check_itm_score
    from trainers.deployment.comparison import compare_accuracy, compare_latency, format_accuracy, format_latency
    from trainers.deployment.graphs import export_task
    from trainers.deployment.onnx_export import check_export_folder, export_onnx
    from trainers.deployment.onnx_models import load_onnx_model
    from trainers.deployment.torch_int8 import quantize_torch_int8
    from trainers.evaluation.retrieval import ITM_SCORE_WORDS
    from trainers.tasks import task_spec
    from trainers.training import check_answer_list_task, check_text_limit, checked_eval_dataset, read_answer_list

    (args,) = parse_arguments(
        "export", (ExportArguments,), argv, "Export a task model's inference graphs to ONNX (optionally int8)."
    )
    # Every option is checked before the first graph is exported (minutes for a large model), not after.
    check_not_mask_checkpoint(args.model_name_or_path, "--model_name_or_path")
    check_export_folder(args.output_dir, "--output_dir")
    check_itm_score(args.itm_score, "--itm_score", rerank=True)
    if args.benchmark_batch_size > 0:
        for flag in ("repeats", "rounds", "benchmark_text_length"):
            if getattr(args, flag) < 1:
                raise ValueError(
                    f"--{flag} must be at least 1 for the latency comparison; got {getattr(args, flag)} (skip the "
                    "comparison with --benchmark_batch_size 0)."
                )
    answer_list = read_answer_list(args.answer_list)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model = AutoModel.from_pretrained(args.model_name_or_path).float().eval()
    finally:
        logging.set_verbosity(verbosity)
    try:
        task = export_task(model)
    except ValueError as error:
        raise ValueError(f"--model_name_or_path {args.model_name_or_path}: {error}") from None
    check_answer_list_task(args.answer_list, task)
    positions = model.config.text_config.max_position_embeddings
    if args.benchmark_batch_size > 0 and args.benchmark_text_length > positions:
        raise ValueError(
            f"--benchmark_text_length {args.benchmark_text_length} is longer than the model's position table "
            f"({positions}); give at most {positions}."
        )
    processor = None
    try:
        processor = modeling_efficientvlm.EfficientVLMProcessor.from_pretrained(args.model_name_or_path)
    except (OSError, ValueError, TypeError) as error:
        if args.eval_file:
            raise ValueError(
                f"--eval_file needs the model's processor, but {args.model_name_or_path} has none ({error})."
            ) from error
    # The graphs' inputs are prepared with it.
    check_text_limit(processor, positions, flag=None, processor_folder=args.model_name_or_path)
    dataset = None
    if args.eval_file:
        if task_spec(task).evaluate is None:
            raise ValueError(
                f"--eval_file scores a task model, but {args.model_name_or_path} is a {task} model "
                f"({type(model).__name__}), which has no task metric: export it without --eval_file, or fine-tune "
                "it for a task first."
            )
        # A file of another task, a missing image (--image_root) or an unreadable one is named here.
        dataset = checked_eval_dataset(
            task,
            args.eval_file,
            args.image_root,
            processor,
            model,
            answer_list,
            args.model_name_or_path,
            answers_source=f"--answer_list {args.answer_list}",
        )
    result = export_onnx(model, args.output_dir, int8=args.int8, processor=processor)
    report: dict[str, Any] = {"task": task, "output_dir": str(result.output_dir), "parity": result.max_errors}
    print(f"{task}: wrote {len(result.max_errors)} graphs to {result.output_dir}")
    if processor is None:
        print(
            f"Note: {args.model_name_or_path} has no processor (tokenizer and image processor), so "
            f"{result.output_dir} has none either: save the one the model was trained with there "
            f"(`processor.save_pretrained({str(result.output_dir)!r})`) to prepare the graphs' inputs."
        )
    for name, error in result.max_errors.items():
        print(f"  {name}: parity with PyTorch OK (max |difference| {error:.2g})")
    if args.benchmark_batch_size > 0:
        rows = compare_latency(
            model,
            result.output_dir,
            args.int8,
            batch_size=args.benchmark_batch_size,
            sequence_length=args.benchmark_text_length,
            repeats=args.repeats,
            rounds=args.rounds,
        )
        threads = torch.get_num_threads()
        print(
            f"\nLatency, batch {args.benchmark_batch_size}, text length {args.benchmark_text_length}, "
            f"{threads} CPU thread{'s' * (threads != 1)}, median of {args.rounds} x {args.repeats} runs per graph:"
        )
        print(format_latency(rows))
        report["latency"] = [row.__dict__ for row in rows]
    if dataset is not None:
        backends = {"PyTorch": model}
        if args.int8:
            backends["PyTorch int8"] = quantize_torch_int8(model)
        backends["ONNX fp32"] = load_onnx_model(result.output_dir)
        if args.int8:
            backends["ONNX int8"] = load_onnx_model(result.output_dir, int8=True)
        metrics = compare_accuracy(
            task,
            backends,
            dataset,
            processor,
            batch_size=args.eval_batch_size,
            k=args.k,
            answer_list=answer_list,
            itm_score=args.itm_score,
        )
        ranking = ""
        if task == "retrieval":
            report["itm_score"] = args.itm_score
            ranking = (
                f"; the top {args.k} ITC candidates of each query re-ranked by the ITM head's "
                f"{ITM_SCORE_WORDS[args.itm_score]}, --itm_score {args.itm_score}"
            )
        images = getattr(dataset, "num_images", None)  # image-text data: images, each with one or more captions
        size = f"{images} images, {len(dataset)} texts" if images is not None else f"{len(dataset)} items"
        print(f"\n{task} metrics on {args.eval_file} ({size}{ranking}):")
        print(format_accuracy(task, metrics))
        report["metrics"] = metrics
    (result.output_dir / "export_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
