"""`efficientvlm evaluate` and `efficientvlm benchmark`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from trainers.tasks import TASKS, build_dataset, evaluate_task, task_model_class


@dataclass
class EvaluateArguments:
    task: str = field(metadata={"help": f"One of {TASKS[1:]}."})
    model_name_or_path: str = field(metadata={"help": "Saved model folder (with its processor) or Hub id."})
    eval_file: str = field(metadata={"help": "X-VLM JSON file of evaluation records."})
    image_root: str | None = field(default=None, metadata={"help": "Folder the records' image paths start from."})
    answer_list: str | None = field(default=None, metadata={"help": "VQA: JSON list of candidate answers."})
    k: int = field(default=128, metadata={"help": "VQA / retrieval: candidates re-ranked per query."})
    batch_size: int = field(default=32)
    output_file: str | None = field(default=None, metadata={"help": "Write the metrics here as JSON."})


def evaluate_main(argv: list[str] | None = None) -> dict[str, float]:
    """Evaluates a saved task model on a JSON split and prints its metrics."""
    from modeling_efficientvlm import EfficientVLMProcessor

    (args,) = HfArgumentParser(EvaluateArguments, description="Evaluate a task model.").parse_args_into_dataclasses(
        args=argv
    )
    model = task_model_class(args.task).from_pretrained(args.model_name_or_path)
    processor = EfficientVLMProcessor.from_pretrained(args.model_name_or_path)
    dataset = build_dataset(args.task, args.eval_file, args.image_root, processor)
    answer_list = json.loads(Path(args.answer_list).read_text()) if args.answer_list else None
    metrics = evaluate_task(
        args.task, model, dataset, processor, batch_size=args.batch_size, answer_list=answer_list, k=args.k
    ).metrics
    print(json.dumps(metrics, indent=2))
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(metrics, indent=2))
    return metrics


@dataclass
class BenchmarkArguments:
    models: list[str] = field(metadata={"help": "Saved model folders; ratios are against the first."})
    batch_size: int = field(default=8)
    text_length: int = field(default=30)
    warmup: int = field(default=3)
    repeats: int = field(default=10)
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads for the run."})


def benchmark_main(argv: list[str] | None = None) -> list:
    """Parameters, FLOPs and median CPU latency of saved models, side by side on the same inputs."""
    import torch
    from transformers import AutoModel

    import modeling_efficientvlm  # noqa: F401  (registers the Auto classes)
    from trainers.evaluation.benchmarking import benchmark_inputs, compare_models, format_table

    (args,) = HfArgumentParser(
        BenchmarkArguments, description="Benchmark the encoders (vision, text, fusion) of saved models."
    ).parse_args_into_dataclasses(args=argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    models = {path: AutoModel.from_pretrained(path) for path in args.models}
    inputs = benchmark_inputs(next(iter(models.values())).config, args.batch_size, args.text_length)
    rows = compare_models(models, inputs, warmup=args.warmup, repeats=args.repeats)
    print(format_table(rows))
    return rows
