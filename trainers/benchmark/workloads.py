"""What a benchmark times: each workload is a zero-argument callable over fixed inputs, built per model.

- `encoders`: the encoder forward (EfficientVLM: vision, text, fusion; BLIP: vision + text-with-cross-attention;
  CLIP vision tower: vision only) on `batch` images and their texts.
- `itm`: image-text matching scores of `batch` image-text pairs (encoders + ITM head).
- `vqa`: answer ranking (X-VLM's k-test) of `batch` questions against `vqa_candidates` answers, `vqa_k` re-scored.
- `retrieval`: end to end over `batch` images x `texts_per_image * batch` texts: encode all, ITC, top-k, ITM
  re-ranking (`trainers.evaluation.retrieval.retrieval_evaluate`, with `retrieval_k`).
- `train-step`: one optimizer step of knowledge distillation (`train-step/distillation`) and one of mask
  learning with sampled hard-concrete masks + the sparsity Lagrangian (`train-step/mask-learning`), each with a
  frozen copy of the same model as the teacher, through the project's own trainers (batch sizes >= 2: ITM
  training needs a negative from another image of the batch). The students train float32 weights; a model
  placed in bfloat16 / float16 trains them under the `Trainer`'s mixed precision of that dtype. Both students
  are the model without an earlier pruning's padding (all-zero FFN neurons), which mask learning removes before
  masking: the two steps train the same model.

Inputs live where the model does, in its dtype; the retrieval workload's images stay on the CPU (a dataset) and
go to the model's device batch by batch, as `efficientvlm evaluate` sends them.

A model that cannot run a workload (a peer without a VQA head) gets no row for it.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .models import BenchmarkModel

WORKLOADS = ("encoders", "itm", "vqa", "retrieval", "train-step")
TRAIN_STEPS = ("train-step/distillation", "train-step/mask-learning")


@dataclass(frozen=True)
class WorkloadShape:
    batch_size: int
    image_size: int
    text_length: int = 16
    vqa_candidates: int = 32
    vqa_k: int = 8
    texts_per_image: int = 5
    retrieval_k: int = 16
    retrieval_batch_size: int = 32
    seed: int = 0


def family_of(workload: str) -> str:
    """Which model a workload needs: `"encoders"` runs on any task model, `"vqa"` on a VQA model, the rest on a
    retrieval model."""
    return workload if workload in ("encoders", "vqa") else "retrieval"


def _vocab_and_size(model: nn.Module) -> tuple[int, int]:
    config = model.config
    text = getattr(config, "text_config", None)
    vision = getattr(config, "vision_config", config)
    return (text.vocab_size if text is not None else 1000), vision.image_size


def _images_and_texts(
    model: nn.Module, shape: WorkloadShape, images: int, texts: int, on_cpu: bool = False
) -> dict[str, torch.Tensor]:
    """Seeded random images and token ids, on the model's device with pixels in its dtype (`on_cpu`: images stay
    on the CPU, in the model's dtype)."""
    vocab, _ = _vocab_and_size(model)
    generator = torch.Generator().manual_seed(shape.seed)
    weight = next(model.parameters())
    device = torch.device("cpu") if on_cpu else weight.device
    pixels = torch.randn(images, 3, shape.image_size, shape.image_size, generator=generator)
    return {
        "pixel_values": pixels.to(device=device, dtype=weight.dtype),
        "input_ids": torch.randint(5, vocab, (texts, shape.text_length), generator=generator).to(device),
        "attention_mask": torch.ones(texts, shape.text_length, dtype=torch.long, device=device),
    }


def can_run(entry: BenchmarkModel, workload: str) -> bool:
    """Whether a model has what `workload` runs (a head of its kind; peers: BLIP's ITM, nothing of CLIP's vision tower
    but the encoders); builds the model of the workload's family, no inputs."""
    if entry.build(family_of(workload.split("/")[0])) is None:
        return False
    if workload == "encoders" or entry.kind == "efficientvlm":
        return True
    return workload == "itm" and entry.kind == "blip"


def build_workloads(entry: BenchmarkModel, workload: str, shape: WorkloadShape) -> dict[str, Callable[[], Any]]:
    """`{workload name: callable}` for one model (two names for `train-step`; one of `TRAIN_STEPS` builds that
    step alone), or `{}` if it cannot run it."""
    steps = (workload,) if workload in TRAIN_STEPS else TRAIN_STEPS
    workload = workload.split("/")[0] if workload in TRAIN_STEPS else workload
    if workload not in WORKLOADS:
        raise ValueError(f"Unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}.")
    if not can_run(entry, workload):
        return {}
    model = entry.build(family_of(workload))
    _, own_size = _vocab_and_size(model)
    interpolate = shape.image_size != own_size
    if workload == "encoders":
        return _encoders(entry.kind, model, shape, interpolate)
    if entry.kind != "efficientvlm":
        return _blip_itm(model, shape, interpolate)
    if workload == "itm":
        return _itm(model, shape, interpolate)
    if workload == "vqa":
        return _vqa(model, shape, interpolate)
    if workload == "retrieval":
        return _retrieval(model, shape, interpolate)
    if shape.batch_size < 2:  # ITM training samples a hard negative from another image of the batch
        raise ValueError(f"The train-step workload needs batches of at least 2; got {shape.batch_size}.")
    return _train_steps(model, shape, interpolate, steps)


def _encoders(kind: str, model: nn.Module, shape: WorkloadShape, interpolate: bool) -> dict[str, Callable]:
    inputs = _images_and_texts(model, shape, shape.batch_size, shape.batch_size)
    pixels = inputs["pixel_values"]
    if kind == "clip-vision":
        return {"encoders": lambda: model(pixel_values=pixels, interpolate_pos_encoding=interpolate)}
    if kind == "blip":

        def blip_encoders() -> Any:
            images = model.vision_model(pixel_values=pixels, interpolate_pos_encoding=interpolate)[0]
            return model.text_encoder(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], encoder_hidden_states=images
            )

        return {"encoders": blip_encoders}
    backbone = getattr(model, "efficientvlm", model)
    return {"encoders": lambda: backbone(**inputs, interpolate_pos_encoding=interpolate)}


def _blip_itm(model: nn.Module, shape: WorkloadShape, interpolate: bool) -> dict[str, Callable]:
    inputs = _images_and_texts(model, shape, shape.batch_size, shape.batch_size)
    return {"itm": lambda: model(**inputs, use_itm_head=True, interpolate_pos_encoding=interpolate)}


def _itm(model: nn.Module, shape: WorkloadShape, interpolate: bool) -> dict[str, Callable]:
    inputs = _images_and_texts(model, shape, shape.batch_size, shape.batch_size)

    def itm() -> torch.Tensor:
        images, _ = model.embed_images(inputs["pixel_values"], interpolate_pos_encoding=interpolate)
        texts, _ = model.embed_texts(inputs["input_ids"], inputs["attention_mask"])
        return model.itm_scores(images, texts, inputs["attention_mask"])

    return {"itm": itm}


def _vqa(model: nn.Module, shape: WorkloadShape, interpolate: bool) -> dict[str, Callable]:
    inputs = _images_and_texts(model, shape, shape.batch_size, shape.batch_size)
    vocab, _ = _vocab_and_size(model)
    generator = torch.Generator().manual_seed(shape.seed + 1)
    # "[CLS] answer [SEP]" of 1-4 answer tokens, padded: what `set_answer_candidates` stores.
    lengths = torch.randint(3, 7, (shape.vqa_candidates,), generator=generator)
    candidates = torch.randint(5, vocab, (shape.vqa_candidates, 6), generator=generator)
    candidates_mask = (torch.arange(6) < lengths[:, None]).long()
    candidates[:, 0] = 2  # the same start token for every candidate, as rank_answers requires
    candidates = candidates * candidates_mask

    def vqa() -> Any:
        return model.rank_answers(
            inputs["pixel_values"],
            inputs["input_ids"],
            inputs["attention_mask"],
            answer_candidates_ids=candidates,
            answer_candidates_mask=candidates_mask,
            k=shape.vqa_k,
            interpolate_pos_encoding=interpolate,
        )

    return {"vqa": vqa}


def _retrieval(model: nn.Module, shape: WorkloadShape, interpolate: bool) -> dict[str, Callable]:
    from trainers.evaluation.retrieval import retrieval_evaluate

    num_texts = shape.texts_per_image * shape.batch_size
    inputs = _images_and_texts(model, shape, shape.batch_size, num_texts, on_cpu=True)
    text_to_image = [text // shape.texts_per_image for text in range(num_texts)]

    def retrieval() -> Any:
        with warnings.catch_warnings():
            # Timed, not scored: what a small k does to the recalls does not matter here.
            warnings.filterwarnings("ignore", message="Re-ranking only the top k", category=UserWarning)
            return retrieval_evaluate(
                model,
                inputs["pixel_values"],
                inputs["input_ids"],
                inputs["attention_mask"],
                text_to_image=text_to_image,
                k=shape.retrieval_k,
                batch_size=shape.retrieval_batch_size,
                interpolate_pos_encoding=interpolate,
            )

    return {"retrieval": retrieval}


def _train_steps(
    model: nn.Module, shape: WorkloadShape, interpolate: bool, steps: tuple[str, ...] = TRAIN_STEPS
) -> dict[str, Callable]:
    """One full optimizer step (forward, KD terms against the teacher, backward, AdamW) through
    `DistillationTrainer` and `ModalAdaptivePruningTrainer`, on a paired batch; the two students are copies of
    `model` without its padding neurons (`drop_silent_ffn_neurons`, removed once: their count is each step's
    `silent_neurons_dropped`), the teacher a frozen copy of `model` (so both steps pay the same teacher). Only the
    trainers of `steps` are built (one step's memory is measured without the other's trainer)."""
    from transformers import TrainingArguments

    from trainers.distillation.objective import DistillationConfig
    from trainers.distillation.trainer import DistillationTrainer
    from trainers.pruning.padding import drop_silent_ffn_neurons
    from trainers.pruning.trainer import ModalAdaptivePruningTrainer, PruningConfig

    inputs = _images_and_texts(model, shape, shape.batch_size, shape.batch_size)
    inputs["pixel_values"] = inputs["pixel_values"].float()  # autocast, not the batch, sets the compute dtype
    if interpolate:
        inputs["interpolate_pos_encoding"] = True
    weight = next(model.parameters())
    mixed = {torch.bfloat16: {"bf16": True}, torch.float16: {"fp16": True}}.get(weight.dtype, {})
    teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the teacher keeps the placed dtype (inference)
    # Nothing is saved there, but `Trainer` wants a folder: removed once the steps that hold it are garbage.
    workdir = tempfile.TemporaryDirectory(prefix="efficientvlm-benchmark-")
    args = TrainingArguments(
        output_dir=workdir.name,
        report_to=[],
        use_cpu=weight.device.type == "cpu",
        save_strategy="no",
        disable_tqdm=True,
        max_steps=1,
        **mixed,
    )
    common = dict(args=args, teacher_model=teacher, distillation_config=DistillationConfig())
    pruning_config = PruningConfig(target_sparsity=0.5)
    # Mask learning removes an earlier pruning's padding (all-zero FFN neurons) from its student before masking it;
    # removed here once, both students train the same model (the step ratio compares one model's two steps).
    student = copy.deepcopy(model).float()
    silent = drop_silent_ffn_neurons(student, include_decoder=pruning_config.prune_decoder)
    kinds = {
        TRAIN_STEPS[0]: (DistillationTrainer, {}),
        TRAIN_STEPS[1]: (ModalAdaptivePruningTrainer, {"pruning_config": pruning_config}),
    }
    trainers = {name: kinds[name][0](model=copy.deepcopy(student), **kinds[name][1], **common) for name in steps}
    del student  # one copy per trainer: no spare student held while the steps run

    def step(trainer: Any) -> Callable[[], Any]:
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which this step bypasses
        optimizer = trainer.create_optimizer()
        # What `Trainer.train` gets from accelerate's prepared model and optimizer: autocast in the mixed dtype,
        # and under fp16 the loss scaler's step (`training_step` already scaled the backward).
        scaler = getattr(trainer.accelerator, "scaler", None)

        def train_step() -> Any:
            with torch.enable_grad(), trainer.accelerator.autocast():
                loss = trainer.training_step(trainer.model, dict(inputs))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        train_step.trainer = trainer  # what the step trains, for a look inside
        train_step.workdir = workdir
        train_step.silent_neurons_dropped = silent  # the padding neurons both students were built without
        return train_step

    return {name: step(trainer) for name, trainer in trainers.items()}


__all__ = ["TRAIN_STEPS", "WORKLOADS", "WorkloadShape", "build_workloads", "can_run", "family_of"]
