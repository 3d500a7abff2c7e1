"""`efficientvlm evaluate`: a saved task model's metrics on a held-out split (VQA accuracy, NLVR2 accuracy,
recall@K, BLEU-4 / CIDEr)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from trainers.commands.common import parse_arguments
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


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Evaluates a saved task model on a JSON split and prints its metrics."""
    from modeling_efficientvlm import EfficientVLMProcessor

    (args,) = parse_arguments("evaluate", (EvaluateArguments,), argv, "Evaluate a task model.")
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


if __name__ == "__main__":
    main()
