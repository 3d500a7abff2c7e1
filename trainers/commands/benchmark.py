"""`efficientvlm benchmark`: parameters, FLOPs, latency, GFLOP/s, % of a matmul peak and (optionally) peak memory of
models side by side in one run, over workloads, batch sizes, image sizes and thread counts.

    efficientvlm benchmark --models teacher student pruned                    # saved folders (or Hub ids)
    efficientvlm benchmark --workload itm --models xvlm-base efficientvlm-small --random_prune 0.5 \\
        --peer blip-base --image_sizes 384 --batch_sizes 1,8 --threads 2
    efficientvlm benchmark --workload retrieval --models efficientvlm-small --batch_sizes 1000 \
        --retrieval_k 128 --retrieval_batch_size 256 --image_sizes 224 --device cuda --dtype bfloat16

Presets (`xvlm-base`, `efficientvlm-small`, `tiny`, ...) get random weights (speed does not depend on them);
`--random_prune` adds copies of every preset pruned with random structure masks; peers (`blip-base`, `clip-b16`)
are Transformers' models built from their configs, without any download. Defaults are the demo report's
(`trainers.benchmark.BenchmarkSettings`): the encoders workload at batch 32, 16 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainers.commands.common import (
    check_folder_or_hub_id,
    check_model_folder,
    check_not_mask_checkpoint,
    parse_arguments,
)

DEFAULT_RANDOM_PRUNE = "0.35,0.5"
BATCH_SIZES_DEFAULT = "32"


@dataclass
class BenchmarkArguments:
    models: list[str] | None = field(
        default=None,
        metadata={"help": "Saved model folders, Hub ids or presets; speedups are against the first."},
    )
    preset: str | None = field(
        default=None,
        metadata={
            "help": f"Shortcut: this preset against copies randomly pruned at --random_prune "
            f"(default {DEFAULT_RANDOM_PRUNE})."
        },
    )
    random_prune: str | None = field(
        default=None,
        metadata={"help": "Comma-separated sparsities: copies of every preset pruned with random structure masks."},
    )
    prune_pad_multiple: str | None = field(
        default=None,
        metadata={
            "help": "FFN widths of the --random_prune copies padded with zero neurons to multiples of this (default "
            "8, as `efficientvlm prune`; 1: none); comma-separated for one copy per multiple (e.g. 1,8: before/after)."
        },
    )
    peer: list[str] | None = field(
        default=None, metadata={"help": "Peers built from their configs, no download: blip-base, clip-b16."}
    )
    workload: str = field(
        default="encoders",
        metadata={"help": "Comma-separated: encoders, itm, vqa, retrieval, train-step (default encoders)."},
    )
    batch_sizes: str | None = field(
        default=None, metadata={"help": f"Comma-separated batch sizes (default {BATCH_SIZES_DEFAULT})."}
    )
    batch_size: int | None = field(default=None, metadata={"help": "One batch size (same as --batch_sizes N)."})
    image_sizes: str | None = field(
        default=None, metadata={"help": "Comma-separated image sizes (default: the first model's)."}
    )
    threads: str | None = field(
        default=None, metadata={"help": "Comma-separated torch thread counts (default: torch's current setting)."}
    )
    text_length: int = field(default=16, metadata={"help": "Tokens per text."})
    warmup: int = field(default=3, metadata={"help": "Untimed calls before each timed round."})
    repeats: int = field(default=10, metadata={"help": "Timed calls per model and round."})
    rounds: int = field(default=2, metadata={"help": "Interleaved rounds over the models."})
    vqa_candidates: int = field(default=32, metadata={"help": "vqa: answer candidates."})
    vqa_k: int = field(default=8, metadata={"help": "vqa: candidates re-scored by the decoder."})
    texts_per_image: int = field(default=5, metadata={"help": "retrieval: texts per image (N images = batch)."})
    retrieval_k: int = field(default=16, metadata={"help": "retrieval: ITC candidates re-ranked by ITM."})
    retrieval_batch_size: int = field(
        default=32, metadata={"help": "retrieval: images / texts per encoder pass and pairs per fusion pass."}
    )
    device: str = field(default="cpu", metadata={"help": "Where the models run: cpu, cuda or cuda:N."})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Weights of the forward workloads: float32, bfloat16 or float16 (CUDA); train steps keep float32 "
            "weights under mixed precision of this dtype. The matmul peak is measured in the same dtype. Several, "
            "comma-separated (float32,bfloat16): each model also runs in the others, as `<model> [bfloat16]` rows "
            "timed in the same rounds, whose base is the model in the first dtype."
        },
    )
    memory: bool = field(
        default=False, metadata={"help": "Also measure peak RSS: one fresh process per model and workload."}
    )
    compile: str | None = field(
        default=None,
        metadata={
            "help": "Add a torch.compile'd row of every model (encoders / itm / vqa workloads), timed in the same "
            "rounds: a mode, `default` (fused elementwise kernels), `reduce-overhead` (+ CUDA graphs), "
            "`max-autotune`, `max-autotune-no-cudagraphs` or `freezing` (default + inductor's freezing: weights "
            "folded in as constants and pre-packed, bias and activation run inside the matmul; the fastest on CPUs)."
        },
    )
    pack_cpu_weights: bool = field(
        default=False,
        metadata={
            "help": "Add a row of every EfficientVLM model running from oneDNN-packed weights (CPU, float32; "
            "`model.pack_cpu_weights()`: bias and residual add inside each product, the FFN activation too on "
            "CPUs with AVX-512; one more copy of the weights in memory), `<model> [packed]`, timed in the same "
            "rounds, whose base is the model itself."
        },
    )
    cpu_attention_kernel: bool = field(
        default=False,
        metadata={
            "help": "Add a row of every EfficientVLM model (its packed copy with --pack_cpu_weights) whose attention "
            'runs on the CPU kernel (`attn_implementation="efficientvlm_cpu"`, float32; built on first use, which '
            "needs a C++ compiler), `<model> [kernel]`, timed in the same rounds, whose base is that model."
        },
    )
    output_json: str | None = field(default=None, metadata={"help": "Write every result and setting to this JSON."})
    plot: str | None = field(
        default=None,
        metadata={
            "help": "Write a plot, latency vs batch size and speedup vs FLOPs reduction, in the format of its suffix "
            "(.png, .svg, .pdf, ...; none: .png is added)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the inputs, the presets' weights and the masks."})


def _numbers(value: str | None, flag: str, kind: type = int) -> tuple:
    if value is None:
        return (None,)
    try:
        numbers = tuple(kind(part) for part in value.split(",") if part.strip())
    except ValueError:
        numbers = ()
    if not numbers:
        raise ValueError(f"{flag} must be comma-separated numbers; got {value!r}.")
    return numbers


def _sparsities(value: str) -> list[float]:
    sparsities = list(_numbers(value, "--random_prune", float))
    if not all(0.0 < s < 1.0 for s in sparsities):  # 0 would add an unpruned copy of the preset, named pruned
        raise ValueError(f"--random_prune must be comma-separated sparsities in (0, 1); got {value!r}.")
    return _distinct(sparsities, "--random_prune")


def _distinct(values: list, flag: str) -> list:
    """`values`, which must not repeat (a repeated model or setting would share one row, or print two alike)."""
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{flag}: {', '.join(repeated)} given more than once.")
    return values


def main(argv: list[str] | None = None):
    """Runs the benchmark, prints the table and notes, writes --output_json / --plot; returns the report."""
    from trainers.benchmark import (
        BenchmarkSettings,
        benchmark_models,
        format_report,
        plot_report,
        run_benchmark,
        write_json,
    )
    from trainers.benchmark.report import check_output_path, plot_path

    (args,) = parse_arguments(
        "benchmark",
        (BenchmarkArguments,),
        argv,
        "Benchmark models side by side: saved folders, presets and randomly pruned copies, peers; over workloads, "
        "batch sizes, image sizes and thread counts.",
    )
    from modeling_efficientvlm.configuration_efficientvlm import PRESETS
    from trainers.benchmark.models import PEERS

    specs = [*(args.models or []), *([args.preset] if args.preset else []), *(args.peer or [])]
    if not specs:
        raise ValueError("Give the models to benchmark: --models (folders, Hub ids or presets), --preset or --peer.")
    for spec in args.models or []:
        if spec not in PRESETS and spec not in PEERS:  # a peer among --models is named below
            check_folder_or_hub_id(spec, "--models")
            check_model_folder(spec, "--models")
            check_not_mask_checkpoint(spec, "--models")
    if args.preset is not None and args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r}: not a preset; choose one of {sorted(PRESETS)}.")
    for peer in args.peer or []:
        if peer not in PEERS:
            raise ValueError(f"--peer {peer!r}: not a peer built here; choose from {sorted(PEERS)}.")
    _distinct(specs, "--models / --preset / --peer")
    # Where the outputs go, checked before anything is timed: a bad path would fail only once the run is done.
    json_path = check_output_path(args.output_json, "--output_json") if args.output_json else None
    plot_file = check_output_path(plot_path(args.plot), "--plot") if args.plot else None
    # Either flag, never both (even when they agree: one would silently win).
    if args.batch_size is not None and args.batch_sizes is not None:
        raise ValueError(f"Give one of --batch_size ({args.batch_size}) and --batch_sizes ({args.batch_sizes!r}).")
    batch_sizes = args.batch_sizes if args.batch_sizes is not None else BATCH_SIZES_DEFAULT
    random_prune = args.random_prune or (DEFAULT_RANDOM_PRUNE if args.preset else None)
    settings = BenchmarkSettings(
        workloads=tuple(w.strip() for w in args.workload.split(",") if w.strip()),
        batch_sizes=(args.batch_size,) if args.batch_size is not None else _numbers(batch_sizes, "--batch_sizes"),
        image_sizes=_numbers(args.image_sizes, "--image_sizes"),
        threads=_numbers(args.threads, "--threads"),
        text_length=args.text_length,
        warmup=args.warmup,
        repeats=args.repeats,
        rounds=args.rounds,
        vqa_candidates=args.vqa_candidates,
        vqa_k=args.vqa_k,
        texts_per_image=args.texts_per_image,
        retrieval_k=args.retrieval_k,
        retrieval_batch_size=args.retrieval_batch_size,
        memory=args.memory,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        pack_cpu_weights=args.pack_cpu_weights,
        cpu_attention_kernel=args.cpu_attention_kernel,
        progress=True,
    )
    pad_multiples = None
    if args.prune_pad_multiple is not None:
        pad_multiples = _distinct(
            list(_numbers(args.prune_pad_multiple, "--prune_pad_multiple")), "--prune_pad_multiple"
        )
        if not all(multiple >= 1 for multiple in pad_multiples):
            raise ValueError(f"--prune_pad_multiple must be integers >= 1; got {args.prune_pad_multiple!r}.")
    models, notes = benchmark_models(
        specs, _sparsities(random_prune) if random_prune else None, args.seed, pad_multiples
    )
    report = run_benchmark(models, settings)
    report.notes = notes + report.notes
    print(format_report(report))
    if json_path is not None:
        print(f"Wrote {write_json(report, json_path)}")
    if plot_file is not None:
        print(f"Wrote {plot_report(report, plot_file)}")
    return report


if __name__ == "__main__":
    main()
