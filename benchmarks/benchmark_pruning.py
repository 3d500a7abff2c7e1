"""Benchmark: what physical pruning buys on CPU.

Builds the `efficientvlm-small` student (6 vision / 3 text / 3 fusion layers; random weights: speed does not
depend on them), prunes copies of it with random structure masks at the target sparsities (0.35 and 0.5 of the
prunable parameters by default), and measures side by side, in one run and on the same inputs (8 images of
224 x 224 and 8 texts of 30 tokens by default), the backbone forward (vision encoder, text encoder, fusion):
parameters, FLOPs (`torch.utils.flop_counter`), median latency, the speedup and FLOPs reduction against the
unpruned model, and their ratio (how much of the FLOPs reduction turns into wall-clock speed).

    python benchmarks/benchmark_pruning.py --num_threads 2 --repeats 5
    python benchmarks/benchmark_pruning.py --tiny          # a seconds-long smoke run on the tiny preset
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForImageTextRetrieval  # noqa: E402
from trainers.evaluation.benchmarking import BenchmarkRow, benchmark_inputs, compare_models, format_table  # noqa: E402
from trainers.pruning.hard_concrete import StructureMasker, random_structure_masks  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="efficientvlm-small", help="model preset to prune")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.35, 0.5], help="target sparsities")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--text_length", type=int, default=30)
    parser.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes before each timed round")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny preset, small batch, few repeats")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset, args.batch_size, args.text_length = "tiny", 2, 8
        args.warmup, args.repeats, args.rounds = 1, 2, 1
    for sparsity in args.sparsities:
        if not 0.0 <= sparsity < 1.0:
            parser.error(f"--sparsities must be in [0, 1); got {sparsity}.")
    return args


def main(argv: list[str] | None = None) -> list[BenchmarkRow]:
    """Runs the benchmark, prints the table and returns its rows (the unpruned model first)."""
    args = parse_args(argv)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    model = EfficientVLMForImageTextRetrieval(EfficientVLMConfig.from_preset(args.preset)).eval()
    masker = StructureMasker.from_model(model)  # exact accounting of the prunable parameters
    generator = torch.Generator().manual_seed(args.seed)
    models, sparsity_lines = {"unpruned": model}, []
    for target in args.sparsities:
        masks = random_structure_masks(model, target, generator)
        pruned = copy.deepcopy(model)
        pruned.prune(masks)
        name = f"pruned {target:g}"
        models[name] = pruned
        per_modality = ", ".join(f"{m} {masker.sparsity_of(masks, m):.3f}" for m in masker.modalities)
        sparsity_lines.append(
            f"{name}: sparsity {masker.sparsity_of(masks):.4f} of the prunable parameters ({per_modality})"
        )
    inputs = benchmark_inputs(model.config, args.batch_size, args.text_length, args.seed)
    rows = compare_models(models, inputs, warmup=args.warmup, repeats=args.repeats, rounds=args.rounds)
    print(
        f"{args.preset}, backbone forward on {args.batch_size} images of {model.config.vision_config.image_size}px "
        f"+ {args.batch_size} texts of {args.text_length} tokens; {torch.get_num_threads()} CPU threads; "
        f"median of {args.rounds} x {args.repeats} passes per model; "
        f"{masker.total_parameters() / 1e6:.2f}M prunable parameters"
    )
    print(format_table(rows))
    print("\n".join(sparsity_lines))
    return rows


if __name__ == "__main__":
    main()
