"""The models a benchmark compares: saved folders or Hub ids, presets (random weights), randomly pruned copies of
presets, and peers built from their Transformers configs (random weights, no download).

Each is a [`BenchmarkModel`]: a name, what it is (`kind`), which model its pruning is measured against (`base`),
and how to build it for a workload family (`"encoders"`: any task model; `"retrieval"`: ITM, retrieval, train
step; `"vqa"`: answer ranking). Building from a [`ModelSource`] is deterministic (seeded), so a fresh process
can rebuild the same model to measure its memory.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modeling_efficientvlm.cpu_attention_efficientvlm import ATTN_IMPLEMENTATION
from trainers.placement import dtype_name
from trainers.pruning.padding import PAD_TO_MULTIPLE_OF

# Peers: Transformers' own models at base size, built from their default-sized configs (random weights).
PEERS = {
    "blip-base": "Transformers' BlipForImageTextRetrieval, BlipConfig() (ViT-B/16 at 384 px + BERT-base)",
    "clip-b16": "Transformers' CLIPVisionModel, ViT-B/16 at 224 px (CLIP's vision tower, as in X-VLM)",
}
KINDS = ("efficientvlm", "blip", "clip-vision")
PACKED_SUFFIX = " [packed]"
KERNEL_SUFFIX = " [kernel]"


@dataclass(frozen=True)
class ModelSource:
    """How to build a model: `spec` is a preset name, a peer name or a folder / Hub id; `sparsity` > 0 prunes a
    preset with random structure masks (seeded by `seed`) to that fraction of its prunable parameters, its FFN
    widths padded with zero neurons to multiples of `pad_to_multiple_of` (`trainers/pruning/padding.py`);
    `pack_cpu_weights`: an EfficientVLM model then runs from oneDNN-packed weights on the CPU
    (`EfficientVLMPreTrainedModel.pack_cpu_weights`); `cpu_attention_kernel`: its attention runs on the CPU
    kernel (`attn_implementation="efficientvlm_cpu"`, `modeling_efficientvlm/cpu_attention_efficientvlm.py`)."""

    spec: str
    sparsity: float = 0.0
    seed: int = 0
    pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF
    pack_cpu_weights: bool = False
    cpu_attention_kernel: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchmarkModel:
    name: str
    kind: str
    source: ModelSource | None = None
    base: str | None = None  # the model whose speed and FLOPs its pruning is measured against
    prebuilt: nn.Module | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    _built: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def place(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Where every model built from now on runs, with weights of `dtype` (models already built move too; a
        prebuilt model is moved in place)."""
        self.device, self.dtype = torch.device(device), dtype
        for model in self._built.values():
            if model is not None:
                model.to(device=self.device, dtype=dtype)

    def in_dtype(self, dtype: torch.dtype) -> BenchmarkModel:
        """A copy of this model that runs with weights of `dtype`: `<name> [bfloat16]`, its base this model, built
        from the same source (a prebuilt model is copied)."""
        return self._variant(f" [{dtype_name(dtype)}]", dtype)

    def packed(self) -> BenchmarkModel:
        """A copy of this EfficientVLM model that runs from oneDNN-packed weights on the CPU: `<name> [packed]`, its
        base this model, built from the same source (a prebuilt model is copied)."""
        return self._variant(PACKED_SUFFIX, pack_cpu_weights=True)

    def with_attention_kernel(self) -> BenchmarkModel:
        """A copy of this EfficientVLM model whose attention runs on the CPU kernel (`attn_implementation=
        "efficientvlm_cpu"`): `<name> [kernel]`, its base this model, built from the same source."""
        return self._variant(KERNEL_SUFFIX, cpu_attention_kernel=True)

    def _variant(self, suffix: str, dtype: torch.dtype | None = None, **options: bool) -> BenchmarkModel:
        """`<name><suffix>`, its base this model: its source with the runtime `options` (`ModelSource` fields) set,
        or a copy of its prebuilt model with them applied, placed in `dtype` (default: this model's)."""
        prebuilt = copy.deepcopy(self.prebuilt) if self.prebuilt is not None else None
        if prebuilt is not None:
            apply_runtime_options(prebuilt, **options)
        source = replace(self.source, **options) if self.source is not None else None
        variant = BenchmarkModel(f"{self.name}{suffix}", self.kind, source, self.name, prebuilt)
        variant.place(self.device, dtype or self.dtype)
        return variant

    def build(self, family: str) -> nn.Module | None:
        """The model for a workload family (`"encoders"`, `"retrieval"` or `"vqa"`), built once; None when this
        model cannot run it (a peer has no VQA head, a saved folder holds one task's model)."""
        for other in ("encoders", "retrieval"):  # one retrieval model serves both: never two copies in memory
            built = self._built.get(other)
            if family in ("encoders", "retrieval") and built is not None and _family_of(built) in (family, "retrieval"):
                return built
        if family not in self._built:
            if self.prebuilt is not None:
                model = self.prebuilt if _family_of(self.prebuilt) == family or family == "encoders" else None
            else:
                model = build_model(self.source, family)
            if model is not None:
                model = model.to(device=self.device, dtype=self.dtype).eval()
            self._built[family] = model
        return self._built[family]


def _family_of(model: nn.Module) -> str:
    if hasattr(model, "rank_answers"):
        return "vqa"
    if hasattr(model, "embed_images") or type(model).__name__ == "BlipForImageTextRetrieval":
        return "retrieval"
    return "other"  # other task models (NLVR2, captioning, pre-training): the encoders workload only


def build_model(source: ModelSource, family: str) -> nn.Module | None:
    """Builds `source` for a workload `family`; None if it has no model of that family."""
    from modeling_efficientvlm import (
        EfficientVLMConfig,
        EfficientVLMForImageTextRetrieval,
        EfficientVLMForQuestionAnswering,
    )
    from modeling_efficientvlm.configuration_efficientvlm import PRESETS

    torch.manual_seed(source.seed)
    if source.spec == "blip-base":
        from transformers import BlipConfig, BlipForImageTextRetrieval

        return BlipForImageTextRetrieval(BlipConfig()) if family != "vqa" else None
    if source.spec == "clip-b16":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        return CLIPVisionModel(CLIPVisionConfig(patch_size=16, image_size=224)) if family == "encoders" else None
    if source.spec in PRESETS:
        config = EfficientVLMConfig.from_preset(source.spec)
        model_class = EfficientVLMForQuestionAnswering if family == "vqa" else EfficientVLMForImageTextRetrieval
        model = model_class(config)
    else:
        from transformers import AutoModel
        from transformers.utils import logging

        import modeling_efficientvlm  # noqa: F401  (registers the Auto classes)

        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # AutoModel loads each folder's task model: no load report to read
        try:
            model = AutoModel.from_pretrained(source.spec)
        except Exception as error:  # hub, network and format errors have many types; the message says which
            if Path(source.spec).expanduser().exists():
                raise
            # Most often a mistyped preset, which Transformers reads as a Hub id: name what was tried.
            raise ValueError(
                f"--models {source.spec!r}: not a preset ({', '.join(sorted(PRESETS))}), a peer "
                f"({', '.join(PEERS)}) or a folder, and not loadable as a Hub id: {error}"
            ) from error
        finally:
            logging.set_verbosity(verbosity)
        if family != "encoders" and _family_of(model) != family:
            return None
    if source.sparsity > 0:
        from trainers.pruning.hard_concrete import random_structure_masks

        masks = random_structure_masks(model, source.sparsity, torch.Generator().manual_seed(source.seed))
        model.prune(masks, pad_to_multiple_of=source.pad_to_multiple_of)
    apply_runtime_options(model, source.pack_cpu_weights, source.cpu_attention_kernel)
    return model


def apply_runtime_options(model: nn.Module, pack_cpu_weights: bool = False, cpu_attention_kernel: bool = False) -> None:
    """What a source's runtime options do to a built model: oneDNN-packed weights, the CPU attention kernel."""
    if pack_cpu_weights:
        model.pack_cpu_weights()
    if cpu_attention_kernel:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


def benchmark_models(
    specs: list[str],
    random_prune: list[float] | None = None,
    seed: int = 0,
    pad_multiples: list[int] | None = None,
) -> tuple[list[BenchmarkModel], list[str]]:
    """Models named by `specs` (presets, peers, folders or Hub ids), each preset followed by copies pruned with
    random structure masks at every `random_prune` sparsity, one per FFN padding multiple of `pad_multiples`
    (default: `PAD_TO_MULTIPLE_OF` alone; with several, each copy's name ends in `pad N`: the same masks padded
    differently); plus one note per pruned copy (its sparsity per modality) and per peer."""
    multiples = list(pad_multiples or [PAD_TO_MULTIPLE_OF])
    if not all(0.0 < sparsity < 1.0 for sparsity in random_prune or []):
        raise ValueError(f"--random_prune sparsities must be in (0, 1); got {random_prune}.")
    from modeling_efficientvlm.configuration_efficientvlm import PRESETS

    models, notes = [], []
    for spec in specs:
        if spec in PEERS:
            models.append(BenchmarkModel(spec, _peer_kind(spec), ModelSource(spec, seed=seed)))
            notes.append(f"{spec}: {PEERS[spec]}, random weights")
            continue
        models.append(BenchmarkModel(spec, "efficientvlm", ModelSource(spec, seed=seed)))
        if spec not in PRESETS:
            continue
        for sparsity in random_prune or []:
            for multiple in multiples:
                name = f"{spec} pruned {sparsity:g}" + (f" pad {multiple}" if len(multiples) > 1 else "")
                source = ModelSource(spec, sparsity, seed, multiple)
                models.append(BenchmarkModel(name, "efficientvlm", source, base=spec))
            notes.append(f"{spec} pruned {sparsity:g}: {_sparsity_note(spec, sparsity, seed)}")
    if random_prune and not any(spec in PRESETS for spec in specs):
        raise ValueError(f"--random_prune prunes copies of presets ({sorted(PRESETS)}); none is among the models.")
    return models, notes


def prebuilt_models(models: dict[str, nn.Module]) -> list[BenchmarkModel]:
    """Already built EfficientVLM task models (the demo's teacher / student / pruned), in order."""
    return [BenchmarkModel(name, "efficientvlm", prebuilt=model) for name, model in models.items()]


def _peer_kind(spec: str) -> str:
    return "blip" if spec.startswith("blip") else "clip-vision"


def _sparsity_note(preset: str, sparsity: float, seed: int) -> str:
    from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForImageTextRetrieval
    from trainers.pruning.hard_concrete import StructureMasker, random_structure_masks

    with torch.device("meta"):  # only the structure sizes matter: no weights allocated
        model = EfficientVLMForImageTextRetrieval(EfficientVLMConfig.from_preset(preset))
    masker = StructureMasker.from_model(model)
    masks = random_structure_masks(model, sparsity, torch.Generator().manual_seed(seed))
    per_modality = ", ".join(f"{m} {masker.sparsity_of(masks, m):.3f}" for m in masker.modalities)
    return f"random masks, sparsity {masker.sparsity_of(masks):.4f} of the prunable parameters ({per_modality})"


__all__ = ["PEERS", "BenchmarkModel", "ModelSource", "benchmark_models", "build_model", "prebuilt_models"]
