"""The `efficientvlm` command: one subcommand per stage of the method."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line description)
COMMANDS = {
    "pretrain": ("trainers.commands.train", "pretrain_main", "pre-train a teacher or student with ITC, ITM and MLM"),
    "finetune": ("trainers.commands.train", "finetune_main", "fine-tune on vqa, nlvr2, retrieval or captioning"),
    "distill": ("trainers.commands.distill", "main", "general distillation of a student from a teacher"),
    "prune": ("trainers.commands.prune", "main", "modal-adaptive pruning of a task model with task distillation"),
    "evaluate": ("trainers.commands.evaluate", "evaluate_main", "a task's metrics on a held-out split"),
    "benchmark": ("trainers.commands.evaluate", "benchmark_main", "parameters, FLOPs and CPU latency of saved models"),
    "demo": ("trainers.demo.run", "main", "the whole method end to end on built-in data (no downloads)"),
}


def _usage() -> str:
    lines = ["usage: efficientvlm <command> [options]   (efficientvlm <command> --help for its options)", ""]
    lines += [f"  {name:<10} {description}" for name, (_, _, description) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"efficientvlm: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[command]
    getattr(importlib.import_module(module), function)(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
