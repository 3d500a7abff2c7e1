"""Model cards of saved models, built with `huggingface_hub.ModelCardData`.

[`write_model_card`] writes `README.md` in a saved folder. Its metadata: `license`, `library_name`,
`pipeline_tag` (from the task registry), `tags`, `base_model` (the teacher or student the model came from),
`datasets` and `eval_results` (so the Hub shows a model-index). Its body: a runnable snippet for the task
(the pipeline first), the training data, size, sparsity per modality (from `pruning_report.json` when the
folder has one), speedup with the hardware it was measured on, limitations and the paper's citation. The repo
it names is the Hub id when pushing, otherwise the folder's name: no placeholders.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from modeling_efficientvlm.loading_efficientvlm import PRUNING_REPORT_FILE
from trainers.evaluation.benchmarking import count_parameters
from trainers.tasks import task_spec

PAPER = "https://arxiv.org/abs/2210.07795"
LICENSE = "apache-2.0"
CITATION = """@inproceedings{wang2023efficientvlm,
  title     = {EfficientVLM: Fast and Accurate Vision-Language Models via Knowledge Distillation and
               Modal-adaptive Pruning},
  author    = {Wang, Tiannan and Zhou, Wangchunshu and Zeng, Yan and Zhang, Xinsong},
  booktitle = {Findings of the Association for Computational Linguistics: ACL 2023},
  year      = {2023},
  eprint    = {2210.07795},
  archivePrefix = {arXiv}
}"""
DEMO_DATASET = "efficientvlm-demo-synthetic-shapes"
DEMO_TRAINING_DATA = (
    "the synthetic corpus of `efficientvlm demo`: generated images of coloured shapes in a grid, with template "
    "captions, VQA questions about colour, shape, count and position, and NLVR2 statements about image pairs. "
    "**It is a demonstration of the method, not for real use**: it has never seen a natural image."
)

# What each stage made, in a card's words (`role` of the demo: teacher, student, pruned).
STAGE_DESCRIPTIONS = {
    "pretrain": "pre-trained",
    "finetune": "fine-tuned",
    "distill": "student made by general distillation",
    "prune": "pruned",
    "teacher": "teacher",
    "student": "distilled student",
    "pruned": "pruned",
    "save": "saved",
    "convert": "converted from an official X-VLM / EfficientVLM checkpoint",
}


@dataclass
class ModelCardInfo:
    """
    The facts of a model card that the saved folder cannot tell by itself.

    Args:
        task: the task (a name of the task registry).
        stage: what made the model: `pretrain`, `finetune`, `distill`, `prune`, or `demo`.
        role: the demo's name for the model (`teacher`, `student`, `pruned`), if any.
        base_model: the teacher or student it came from, as a Hub id or local folder name.
        teacher_model: the teacher it was distilled from (if not `base_model`).
        source_checkpoint: the checkpoint file a converted model comes from (named in the text only: the Hub reads
            `base_model` as a model id).
        datasets: Hub ids (or local names) of the training data.
        training_data: a sentence on what it was trained on (default: the `datasets`).
        synthetic_data: trained on the demo's synthetic shapes (the card says so, and not for real use).
        metrics: evaluation metrics (become `eval_results`); `eval_dataset` names the data they come from (default:
            the first of `datasets`), `eval_split` its split.
        benchmark: size and speed measured side by side: `parameters`, `gflops`, `median_ms`, `speedup`
            (against `benchmark_reference`, default the teacher).
        hardware: what the benchmark ran on (default: this machine's CPU).
        answer_candidates: VQA: how many answer candidates are saved in the config, and how they were built.
    """

    task: str
    stage: str
    role: str | None = None
    base_model: str | None = None
    teacher_model: str | None = None
    source_checkpoint: str | None = None
    datasets: list[str] = field(default_factory=list)
    training_data: str | None = None
    synthetic_data: bool = False
    metrics: dict[str, float] | None = None
    eval_dataset: str | None = None
    eval_split: str = "eval"
    benchmark: dict[str, Any] | None = None
    benchmark_reference: str = "the teacher"
    hardware: str | None = None
    answer_candidates: int | None = None
    answer_candidates_source: str | None = None

    def __post_init__(self) -> None:
        task_spec(self.task)  # an unknown task raises here
        if self.synthetic_data:
            self.datasets = list(self.datasets) or [DEMO_DATASET]

    @property
    def description(self) -> str:
        """What the model is, e.g. "pruned vqa model"."""
        made = STAGE_DESCRIPTIONS.get(self.role or self.stage, self.role or self.stage)
        return f"{made} {self.task} model"

    def commit_message(self, pruning_report: dict[str, Any] | None = None) -> str:
        """The commit message of a push, naming the stage, e.g. "efficientvlm prune: pruned vqa model, sparsity
        0.35"."""
        stage = "demo" if self.role else self.stage
        message = f"efficientvlm {stage}: {self.description}"
        if pruning_report is not None and pruning_report.get("sparsity") is not None:
            message += f", sparsity {pruning_report['sparsity']:.2f}"
        return message


def local_name(name_or_path: str | os.PathLike | None) -> str | None:
    """A model's name for `base_model`: a local folder's name, or the Hub id as given."""
    if name_or_path is None:
        return None
    return Path(name_or_path).absolute().name if os.path.isdir(name_or_path) else str(name_or_path)


def describe_hardware() -> str:
    """This machine's CPU, e.g. "Intel(R) Xeon(R) CPU @ 2.20GHz (x86_64), 2 cores, 1 torch thread"."""
    import torch

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{name} ({platform.machine()}), {os.cpu_count()} cores, {threads} torch thread{'s' * (threads != 1)}"


# -- the snippets -----------------------------------------------------------------------------------------------
# transformers' pipelines open images with `load_image`, a plain `convert("RGB")`; the processor does more.
PIPELINE_IMAGES_NOTE = (
    'Pipelines open images with a plain `convert("RGB")`: transparent pixels keep their own colour (often black) '
    "and 16-bit values clip to white, where the processor (and training) composite on white and scale 16 bits. For "
    "such images pass `processor.image_processor.to_rgb_image(image)` to the pipeline."
)


def usage_snippet(task: str, repo: str, answer_candidates: bool = True) -> str:
    """A runnable snippet for a `task` model saved at `repo` (Hub id or folder): the pipeline first. (The tests
    run every snippet against a saved folder of each task, with `photo.jpg`, `left.jpg` and `right.jpg`.)"""
    load = f'"{repo}", trust_remote_code=True'
    processor = f"processor = AutoProcessor.from_pretrained({load})"
    if task == "retrieval":
        return f"""```python
from transformers import pipeline

classifier = pipeline("zero-shot-image-classification", model="{repo}", trust_remote_code=True)
labels = ["a red circle", "a blue square", "a green star"]
print(classifier("photo.jpg", candidate_labels=labels, hypothesis_template="{{}}"))
```

The pipeline's scores are the image-text contrastive (ITC) similarities, softmaxed over the labels;
`hypothesis_template="{{}}"` scores the labels as written (the pipeline's default, "This is a photo of {{}}.",
wraps each label in an English sentence first, words a vocabulary trained on one's own captions may not have). For
retrieval over a collection, embed images and texts once (CLIP-style) and re-rank the best candidates with the
image-text matching (ITM) head (`model.itm_rerank_scores`):

```python
from PIL import Image, ImageOps
from transformers import AutoModelForZeroShotImageClassification, AutoProcessor

model = AutoModelForZeroShotImageClassification.from_pretrained({load}).eval()
{processor}
image = ImageOps.exif_transpose(Image.open("photo.jpg"))  # upright, as the pipelines read files
image_features = model.get_image_features(**processor(images=[image]))
text_features = model.get_text_features(**processor(text=["a red circle", "a blue square"]))
print(image_features @ text_features.T)  # cosine similarities, (1 image, 2 texts)
```"""
    if task == "vqa" and not answer_candidates:
        return f"""```python
from transformers import pipeline

vqa = pipeline("image-text-to-text", model="{repo}", trust_remote_code=True, return_full_text=False)
print(vqa("photo.jpg", text="what color is the circle ?"))  # the answer only
```

This model saves no answer candidates, so the answer is decoded freely. To rank a fixed list (X-VLM's k-test), save
one with it: `model.set_answer_candidates(answers, processor.tokenizer)`, then `model.save_pretrained(...)`, or give
`efficientvlm convert` / `finetune` an `--answer_list`."""
    if task == "vqa":
        return f"""```python
from transformers import pipeline

vqa = pipeline("image-text-to-text", model="{repo}", trust_remote_code=True, return_full_text=False)
print(vqa("photo.jpg", text="what color is the circle ?"))  # the answer only
```

The answer is ranked from the candidates saved with the model (X-VLM's k-test); directly:

```python
from PIL import Image, ImageOps
from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor

model = AutoModelForVisualQuestionAnswering.from_pretrained({load}).eval()
{processor}
image = ImageOps.exif_transpose(Image.open("photo.jpg"))  # upright, as the pipelines read files
inputs = processor(images=[image], text=["what color is the circle ?"])
print(model.rank_answers(**inputs, k=128).answers)  # from `model.config.answer_candidates`
```"""
    if task == "captioning":
        return f"""```python
from transformers import pipeline

captioner = pipeline("image-text-to-text", model="{repo}", trust_remote_code=True)
print(captioner("photo.jpg", text="a picture of", max_new_tokens=30))  # "a picture of ..."
```

or with `generate`:

```python
from PIL import Image, ImageOps
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained({load}).eval()
{processor}
image = ImageOps.exif_transpose(Image.open("photo.jpg"))  # upright, as the pipelines read files
inputs = processor(images=[image], text=["a picture of"])
caption_ids = model.generate(**inputs, max_new_tokens=30)
print(processor.batch_decode(caption_ids, skip_special_tokens=True))
```"""
    if task == "nlvr2":
        return f"""NLVR2 judges a sentence against *two* images, which no `transformers` pipeline takes; one call
does it:

```python
from PIL import Image, ImageOps
from transformers import AutoModelForSequenceClassification, AutoProcessor

model = AutoModelForSequenceClassification.from_pretrained({load}).eval()
{processor}
left, right = (ImageOps.exif_transpose(Image.open(name)) for name in ("left.jpg", "right.jpg"))  # upright
print(model.predict(left, right, "the left image contains a red circle .", processor))
# [{{"label": True, "probabilities": {{"False": ..., "True": ...}}}}]
```"""
    return f"""```python
from PIL import Image, ImageOps
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained({load}).eval()  # the pre-training model, with its ITC, ITM and MLM heads
{processor}
image = ImageOps.exif_transpose(Image.open("photo.jpg"))  # upright, as the pipelines read files
image_features = model.get_image_features(**processor(images=[image]))
text_features = model.get_text_features(**processor(text=["a red circle"]))
```

Start a task model from it with `efficientvlm finetune --task vqa --model_name_or_path {repo} ...`."""


# -- the card ------------------------------------------------------------------------------------------------
def _numeric(metrics: dict[str, Any] | None) -> dict[str, float]:
    return {name: float(value) for name, value in (metrics or {}).items() if isinstance(value, (int, float))}


def card_data(info: ModelCardInfo, model_name: str) -> ModelCardData:
    """The card's metadata (the YAML header)."""
    spec = task_spec(info.task)
    pruned = info.stage == "prune" or info.role == "pruned"
    tags = ["efficientvlm", "vision-language", "knowledge-distillation", info.task, "custom_code"]
    if pruned:
        tags.insert(3, "pruning")
    if info.synthetic_data:
        tags.append("demo")
    metrics = _numeric(info.metrics)
    eval_results = None
    if metrics:
        dataset = info.eval_dataset or (info.datasets[0] if info.datasets else "held-out-split")
        eval_results = [
            EvalResult(
                task_type=spec.pipeline_tag or info.task,
                task_name=spec.primary_metric_label or info.task,
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split=info.eval_split,
                metric_type=name,
                metric_name=name,
                metric_value=round(value, 6),
            )
            for name, value in metrics.items()
        ]
    return ModelCardData(
        license=LICENSE,
        library_name="transformers",
        pipeline_tag=spec.pipeline_tag,
        tags=tags,
        base_model=info.base_model,
        datasets=list(info.datasets) or None,
        model_name=model_name,
        eval_results=eval_results,
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _size_lines(info: ModelCardInfo, model: Any, pruning_report: dict[str, Any] | None) -> list[str]:
    lines = []
    if model is not None:
        parameters = count_parameters(model)
        lines.append(f"- parameters: {parameters:,} ({parameters / 1e6:.2f}M)")
    if pruning_report is not None:
        lines.append(
            f"- pruning removed {pruning_report['parameters_before'] - pruning_report['parameters_after']:,} "
            f"parameters ({pruning_report['parameters_before']:,} before)"
        )
        padding = pruning_report.get("padding") or {}
        if padding.get("padded_parameters"):
            lines.append(
                f"- of the parameters kept, {padding['padded_parameters']:,} are zero FFN neurons padding each pruned "
                f"FFN to a multiple of {padding['pad_to_multiple_of']} neurons (faster matmuls; no effect on outputs)"
            )
    benchmark = info.benchmark
    if benchmark is not None:
        if benchmark.get("gflops") is not None:
            lines.append(f"- encoder GFLOPs per benchmark batch: {benchmark['gflops']:.3f}")
        hardware = info.hardware or describe_hardware()
        lines.append(
            f"- median latency: {benchmark['median_ms']:.1f} ms, **{benchmark['speedup']:.2f}x** the speed of "
            f"{info.benchmark_reference}, measured side by side in the same run on {hardware}"
        )
    else:
        lines.append("- speed: not measured for this folder (`efficientvlm benchmark --models ...` measures it)")
    return lines


def _pruning_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        f"One global target sparsity ({report.get('target_sparsity')}) decided how much each modality keeps; "
        f"the model kept the structures below and the rest were cut out of the weights.",
        "",
        f"- overall sparsity of the prunable parameters: **{report['sparsity']:.3f}**",
    ]
    for modality, value in report.get("sparsity_per_modality", {}).items():
        lines.append(f"- {modality}: {value:.3f} of its prunable parameters removed")
    return lines


def _limitations(info: ModelCardInfo) -> list[str]:
    lines = []
    if info.synthetic_data:
        lines.append(
            "- Trained only on synthetic shapes by the demo: its outputs on real photos are meaningless. Use it to "
            "try the code paths, not to answer questions about images."
        )
    if info.stage in ("distill", "prune") or info.role in ("student", "pruned"):
        lines.append("- A compressed model: expect some loss against its teacher; check its metrics on your own data.")
    lines += [
        "- English, lowercased WordPiece text; texts longer than the model's text limit are truncated (with a "
        "warning).",
        "- It inherits the biases of its training data and of the models it was distilled from.",
        "- The code ships with the checkpoint: loading needs `trust_remote_code=True`.",
    ]
    if info.task == "vqa":
        lines.append("- Ranking answers picks only from the saved candidates; `generate` can answer outside them.")
    return lines


def build_model_card(
    info: ModelCardInfo,
    repo: str,
    model: Any = None,
    pruning_report: dict[str, Any] | None = None,
) -> ModelCard:
    """The card of a model saved as `repo` (a Hub id or a folder's name)."""
    spec = task_spec(info.task)
    data = card_data(info, model_name=repo.split("/")[-1])
    title = f"EfficientVLM: {info.description}"
    origin = []
    if info.source_checkpoint:
        origin.append(f"It was converted from `{info.source_checkpoint}`")
    if info.base_model:
        origin.append(f"It comes from `{info.base_model}`")
    if info.teacher_model and info.teacher_model != info.base_model:
        origin.append(f"with knowledge distillation from `{info.teacher_model}`")
    lines = [
        f"# {title}",
        "",
        f"An X-VLM-style vision-language model for **{info.task}** ({spec.card_description}), made with "
        f"[EfficientVLM]({PAPER}): knowledge distillation and modal-adaptive pruning. This one is the "
        f"{info.description}.",
    ]
    if origin:
        lines += ["", " ".join(origin) + "."]
    candidates = info.answer_candidates or getattr(getattr(model, "config", None), "answer_candidates", None)
    lines += ["", "## How to use", "", usage_snippet(info.task, repo, answer_candidates=bool(candidates))]
    if task_spec(info.task).pipeline_tag is not None:  # the snippet's pipeline reads the images
        lines += ["", PIPELINE_IMAGES_NOTE]
    lines += ["", "## Training data", ""]
    if info.synthetic_data:
        lines.append(f"Trained on {DEMO_TRAINING_DATA}")
    elif info.training_data:
        lines.append(f"Trained on {info.training_data}")
    elif info.datasets:
        lines.append("Trained on " + ", ".join(f"`{name}`" for name in info.datasets) + ".")
    else:
        lines.append("The data it was trained on was not recorded when it was saved.")
    if info.answer_candidates:
        source = info.answer_candidates_source or "the answer list of its training data"
        lines += [
            "",
            f"Its {info.answer_candidates} answer candidates ({source}) are saved in its config; `rank_answers` "
            "ranks them by default.",
        ]
    metrics = _numeric(info.metrics)
    if metrics:
        where = f" on the {info.eval_split} split of `{info.eval_dataset or (info.datasets or ['its data'])[0]}`"
        lines += ["", "## Evaluation", "", f"Metrics{where}:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in metrics.items()]
    lines += ["", "## Size and speed", "", *_size_lines(info, model, pruning_report)]
    if pruning_report is not None:
        lines += ["", "## Modal-adaptive pruning", "", *_pruning_lines(pruning_report)]
    lines += ["", "## Limitations", "", *_limitations(info)]
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def write_model_card(
    folder: str | os.PathLike,
    info: ModelCardInfo,
    model: Any = None,
    repo_id: str | None = None,
) -> ModelCard:
    """Writes `README.md` in the saved `folder`: the card of `info`, naming the model `repo_id` (when pushed)
    or the folder's name; the sparsity per modality comes from the folder's `pruning_report.json`."""
    folder = Path(folder)
    card = build_model_card(
        info,
        repo=repo_id or folder.absolute().name,
        model=model,
        pruning_report=_read_json(folder / PRUNING_REPORT_FILE),
    )
    card.save(folder / "README.md")
    return card


__all__ = ["ModelCardInfo", "build_model_card", "describe_hardware", "local_name", "usage_snippet", "write_model_card"]
