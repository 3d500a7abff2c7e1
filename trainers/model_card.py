"""Model cards for saved models (`huggingface_hub.ModelCard`) and pushing a set of folders to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from trainers.tasks import task_spec

PAPER = "https://arxiv.org/abs/2210.07795"


def _sparsity_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        f"- overall sparsity of the prunable parameters: **{report['sparsity']:.3f}** "
        f"(target {report['target_sparsity']})",
        f"- parameters: {report['parameters_before']:,} -> {report['parameters_after']:,}",
    ]
    for modality, value in report["sparsity_per_modality"].items():
        lines.append(f"- {modality}: {value:.3f} of its prunable parameters removed")
    return lines


def write_model_card(
    folder: str | Path,
    task: str,
    role: str,
    metrics: dict[str, float],
    benchmark: dict[str, Any] | None = None,
    pruning_report: dict[str, Any] | None = None,
) -> ModelCard:
    """Writes `README.md` in `folder`: what the model is, its metrics, size and speed, and (for a pruned
    model) the sparsity the method chose for each modality. The task's facts (Auto class, pipeline tag,
    wording) come from the task registry."""
    spec = task_spec(task)
    data = ModelCardData(
        library_name="transformers",
        tags=["efficientvlm", "vision-language", "knowledge-distillation", "pruning", task],
        pipeline_tag=spec.pipeline_tag,
    )
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# EfficientVLM {role} for {task}",
        "",
        f"An X-VLM-style vision-language model ({role}) for **{task}** ({spec.card_description}), "
        f"made with [EfficientVLM]({PAPER}): knowledge distillation and modal-adaptive pruning.",
        "",
        "```python",
        f"from transformers import AutoProcessor, {spec.auto_class}",
        "",
        f'model = {spec.auto_class}.from_pretrained("<this repo>", trust_remote_code=True)',
        'processor = AutoProcessor.from_pretrained("<this repo>", trust_remote_code=True)',
        "```",
        "",
        "## Metrics (held-out split)",
        "",
        *(f"- {name}: {value:.4f}" for name, value in metrics.items()),
    ]
    if benchmark is not None:
        lines += [
            "",
            "## Size and speed (measured side by side with its teacher, CPU)",
            "",
            f"- parameters: {benchmark['parameters']:,}",
            f"- encoder GFLOPs per batch: {benchmark['gflops']:.3f}",
            f"- median latency: {benchmark['median_ms']:.1f} ms ({benchmark['speedup']:.2f}x the teacher)",
        ]
    if pruning_report is not None:
        lines += ["", "## Modal-adaptive pruning", "", *_sparsity_lines(pruning_report)]
    card = ModelCard("\n".join(lines) + "\n")
    card.save(Path(folder) / "README.md")
    return card


def push_models(folders: dict[str, str | Path], hub_prefix: str, private: bool = False) -> list[str]:
    """Pushes each saved folder (weights, config with `auto_map`, code, processor, model card) to
    `<hub_prefix>-<name>` with `upload_folder`. Returns the repo ids."""
    from huggingface_hub import HfApi

    api = HfApi()
    repos = []
    for name, folder in folders.items():
        repo_id = f"{hub_prefix}-{name}"
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f"EfficientVLM demo: {name}")
        repos.append(repo_id)
    return repos
