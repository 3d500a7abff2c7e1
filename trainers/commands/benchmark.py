"""`efficientvlm benchmark`: parameters, FLOPs and median CPU latency of models, side by side in one run.

Two modes, measured the same way (the backbone forward: vision encoder, text encoder, fusion; on the same
inputs; latency rounds interleaved over the models; ratios against the first model):

    efficientvlm benchmark --models teacher student pruned          # saved model folders
    efficientvlm benchmark --preset efficientvlm-small --random_prune 0.35,0.5 --num_threads 2 --repeats 5

The second shows what physical pruning buys: a preset model (random weights: speed does not depend on them)
against copies of it pruned with random structure masks at the given sparsities of its prunable parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainers.commands.common import parse_arguments

DEFAULT_RANDOM_PRUNE = "0.35,0.5"


@dataclass
class BenchmarkArguments:
    models: list[str] | None = field(
        default=None, metadata={"help": "Saved model folders; ratios are against the first."}
    )
    preset: str | None = field(
        default=None,
        metadata={"help": "Instead of --models: a preset (e.g. efficientvlm-small) against randomly pruned copies."},
    )
    random_prune: str | None = field(
        default=None,
        metadata={
            "help": "With --preset: comma-separated target sparsities of the randomly pruned copies "
            f"(default {DEFAULT_RANDOM_PRUNE})."
        },
    )
    batch_size: int = field(default=8)
    text_length: int = field(default=30)
    warmup: int = field(default=3, metadata={"help": "Untimed passes before each timed round."})
    repeats: int = field(default=10, metadata={"help": "Timed passes per round."})
    rounds: int = field(default=2, metadata={"help": "Interleaved rounds over the models."})
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads for the run."})
    seed: int = field(default=0, metadata={"help": "Seed of the inputs, the preset's weights and the masks."})


def _sparsities(value: str) -> list[float]:
    try:
        sparsities = [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        sparsities = []
    if not sparsities or not all(0.0 <= s < 1.0 for s in sparsities):
        raise ValueError(f"--random_prune must be comma-separated sparsities in [0, 1); got {value!r}.")
    return sparsities


def randomly_pruned_models(preset: str, sparsities: list[float], seed: int = 0) -> tuple[dict[str, Any], list[str]]:
    """A `preset` retrieval model with random weights ("unpruned") and copies of it physically pruned with random
    structure masks at each target sparsity ("pruned <s>"), plus one line per copy with its sparsity per modality."""
    import copy

    import torch

    from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForImageTextRetrieval
    from trainers.pruning.hard_concrete import StructureMasker, random_structure_masks

    torch.manual_seed(seed)
    model = EfficientVLMForImageTextRetrieval(EfficientVLMConfig.from_preset(preset)).eval()
    masker = StructureMasker.from_model(model)  # exact accounting of the prunable parameters
    generator = torch.Generator().manual_seed(seed)
    models, lines = {"unpruned": model}, []
    for target in sparsities:
        masks = random_structure_masks(model, target, generator)
        name = f"pruned {target:g}"
        models[name] = copy.deepcopy(model)
        models[name].prune(masks)
        per_modality = ", ".join(f"{m} {masker.sparsity_of(masks, m):.3f}" for m in masker.modalities)
        lines.append(f"{name}: sparsity {masker.sparsity_of(masks):.4f} of the prunable parameters ({per_modality})")
    lines.append(f"{masker.total_parameters() / 1e6:.2f}M prunable parameters in {preset}")
    return models, lines


def main(argv: list[str] | None = None) -> list:
    """Runs the benchmark, prints the table (and, for --preset, the sparsity of each pruned copy); returns the rows,
    the reference model first."""
    import torch

    from trainers.evaluation.benchmarking import benchmark_inputs, compare_models, format_table

    (args,) = parse_arguments(
        "benchmark",
        (BenchmarkArguments,),
        argv,
        "Benchmark the encoders (vision, text, fusion) of saved models (--models), or of a preset against randomly "
        "pruned copies of it (--preset, --random_prune).",
    )
    if (args.models is None) == (args.preset is None):
        raise ValueError("Give exactly one of --models and --preset.")
    if args.random_prune is not None and args.preset is None:
        raise ValueError("--random_prune prunes copies of a --preset model; it does not apply to --models.")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.preset is not None:
        sparsities = _sparsities(args.random_prune or DEFAULT_RANDOM_PRUNE)
        models, notes = randomly_pruned_models(args.preset, sparsities, args.seed)
    else:
        from transformers import AutoModel
        from transformers.utils import logging

        import modeling_efficientvlm  # noqa: F401  (registers the Auto classes)

        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # AutoModel loads each folder's task model: no load report to read
        try:
            models, notes = {path: AutoModel.from_pretrained(path) for path in args.models}, []
        finally:
            logging.set_verbosity(verbosity)
    config = next(iter(models.values())).config
    inputs = benchmark_inputs(config, args.batch_size, args.text_length, args.seed)
    rows = compare_models(models, inputs, warmup=args.warmup, repeats=args.repeats, rounds=args.rounds)
    if args.preset is not None:
        print(
            f"{args.preset}, backbone forward on {args.batch_size} images of {config.vision_config.image_size}px + "
            f"{args.batch_size} texts of {args.text_length} tokens; {torch.get_num_threads()} CPU threads; "
            f"median of {args.rounds} x {args.repeats} passes per model"
        )
    print("\n".join([format_table(rows), *notes]))
    return rows


if __name__ == "__main__":
    main()
