"""The tiny models and data shared by `tests/test_distributed.py` and the `torchrun` worker it launches."""

from __future__ import annotations

from pathlib import Path

import torch

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForImageTextRetrieval, EfficientVLMForPreTraining

from .conftest import make_inputs
from .data_utils import make_processor, write_image_text_json

# No dropout: its masks come from each process's RNG, so 1 and 2 processes would see other features.
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def tiny_config() -> EfficientVLMConfig:
    text = {"num_hidden_layers": 2, "num_fusion_layers": 2, **NO_DROPOUT}
    return EfficientVLMConfig.from_preset("tiny", vision_config={"num_hidden_layers": 2}, text_config=text)


def itc_model() -> EfficientVLMForPreTraining:
    torch.manual_seed(0)
    return EfficientVLMForPreTraining(tiny_config()).train()


def itc_batch(config: EfficientVLMConfig, global_batch: int) -> dict[str, torch.Tensor]:
    """A fixed global batch; image `i` appears at rows `i` and `i + global_batch / 2`, so with 2 processes
    every image has a positive text in the other process."""
    inputs = make_inputs(config, batch_size=global_batch, seed=1)
    inputs["image_ids"] = torch.arange(global_batch) % (global_batch // 2)
    return inputs


def write_workdir(workdir: Path) -> None:
    """The data (8 images, 2 captions each) and the teachers the worker trains from."""
    write_image_text_json(workdir, n=8, captions_per_image=2)
    processor = make_processor(workdir, image_size=32, max_length=16)
    torch.manual_seed(0)
    EfficientVLMForPreTraining(tiny_config()).save_pretrained(workdir / "pretraining_teacher")
    processor.save_pretrained(workdir / "pretraining_teacher")
    torch.manual_seed(1)
    EfficientVLMForImageTextRetrieval(tiny_config()).save_pretrained(workdir / "retrieval_teacher")
    processor.save_pretrained(workdir / "retrieval_teacher")


def distill_flags(workdir: Path) -> list[str]:
    """The `distill` flags every run of the distributed tests shares (the workers' and the 1-process reference's):
    the tiny teacher and data `write_workdir` wrote, a 1/1/1 student, the ITC KD term only."""
    return [
        "--teacher_model_name_or_path", str(workdir / "pretraining_teacher"),
        "--train_file", str(workdir / "image_text.json"),
        "--image_root", str(workdir / "images"),
        "--student_layers", "1,1,1",
        "--kd_term_weights", '{"itc": 1.0}',
    ]  # fmt: skip
