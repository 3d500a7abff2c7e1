"""The `efficientvlm` command: one subcommand per stage of the method, one module per subcommand
(`trainers.commands.<name>.main`); `common` holds what they share."""

from __future__ import annotations

import importlib
import logging
import os
import sys

from trainers.cpu_memory import keep_freed_memory

# subcommand (its module in this package) -> one-line description
COMMANDS = {
    "processor": "a processor for your own data: a WordPiece vocabulary trained on its texts, or a BERT tokenizer",
    "pretrain": "pre-train a teacher or student with ITC, ITM and MLM",
    "finetune": "fine-tune on vqa, nlvr2, retrieval or captioning",
    "distill": "general distillation of a student from a teacher",
    "prune": "modal-adaptive pruning of a task model with task distillation",
    "evaluate": "a task's metrics on a held-out split",
    "benchmark": "parameters, FLOPs and CPU latency of saved models, or of a preset vs randomly pruned copies",
    "export": "a task model -> ONNX graphs (checked against PyTorch), optionally int8, with speed and accuracy",
    "convert": "an official X-VLM / EfficientVLM .pth checkpoint (pruning-stage ones pruned) -> a model folder",
    "demo": "the whole method end to end on built-in data (no downloads)",
    "recipes": "the named settings of --recipe (paper-vqa, paper-retrieval, ..., small-cpu), one line each",
    "app": "try saved models side by side in a browser: image + question, captions or a second image",
}


def _usage() -> str:
    lines = ["usage: efficientvlm <command> [options]   (efficientvlm <command> --help for its options)", ""]
    lines += [f"  {name:<10} {description}" for name, description in COMMANDS.items()]
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
    # A mistyped value is said before anything runs.
    if os.environ.get("EFFICIENTVLM_CPU_PRODUCTS") or os.environ.get("EFFICIENTVLM_CPU_ACTIVATIONS"):
        from modeling_efficientvlm.packing_efficientvlm import cpu_products_library, fuses_activations

        cpu_products_library()
        fuses_activations()
    _drop_deepspeed_cpu_notice()
    importlib.import_module(f"{__name__}.{command}").main(rest)
    return 0


class _DeepSpeedCPUNotice:
    """Drops DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect
    it." warning, which Transformers' Trainer brings up on every CPU-only run: where torch sees no accelerator either,
    it only misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU.")


def _drop_deepspeed_cpu_notice() -> None:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6; CUDA alone before
    if not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available()):
        logger = logging.getLogger("DeepSpeed")  # the logger DeepSpeed makes for itself, by name
        if not any(isinstance(f, _DeepSpeedCPUNotice) for f in logger.filters):
            logger.addFilter(_DeepSpeedCPUNotice())


def _close_process_group() -> None:
    """Under torchrun: once every process is done, the process group is torn down while the interpreter is still
    whole. Left to interpreter shutdown, a gloo group can abort a process that finished first ("terminate called
    without an active exception", SIGABRT) while a peer is still saving."""
    distributed = sys.modules.get("torch.distributed")  # never imported here just to check
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.barrier()
        distributed.destroy_process_group()


def _is_torch_write_failure(error: RuntimeError) -> bool:
    """Whether `error` is `torch.save` failing to write (a full disk reads "[enforce fail at inline_container.cc:...]
    . unexpected pos ..."; no errno comes with it), not any other RuntimeError."""
    message = str(error)
    return "PytorchStreamWriter" in message or ("inline_container" in message and "unexpected pos" in message)


# Set to 1 for the full traceback of an input error (a bad flag, file or record) instead of its message alone.
TRACEBACK_VARIABLE = "EFFICIENTVLM_TRACEBACK"


def console() -> int:
    """The `efficientvlm` script (and `python -m trainers.commands`): freed memory kept for reuse
    (`trainers.cpu_memory`), [`main`], then a clean end under torchrun. An input error (`ValueError`,
    `OSError`: the checks name the flag, file or record; a file that cannot be read or written, torch's own write
    failures included) prints as one message and exits with 2, as argparse's own errors do; training that stopped
    before its last step (`TrainingStopped`) prints as one message and exits with 1; anything else keeps its
    traceback."""
    from trainers.training import TrainingStopped

    keep_freed_memory()
    try:
        code = main()
    except (ValueError, OSError, RuntimeError) as error:  # TrainingStopped is a RuntimeError
        write_failure = _is_torch_write_failure(error)
        written = isinstance(error, (ValueError, OSError, TrainingStopped)) or write_failure
        if not written or os.environ.get(TRACEBACK_VARIABLE, "0") not in ("", "0"):
            raise
        command = sys.argv[1] if len(sys.argv) > 1 else ""
        message = str(error)
        if write_failure:
            message = (
                f"writing a file failed ({message.strip().splitlines()[0]}): torch's writer stops so when the disk is "
                "full or the file cannot be written. Free space (or give another --output_dir) and resume from the "
                "last complete checkpoint."
            )
        print(
            f"efficientvlm {command}: error: {message}\n({TRACEBACK_VARIABLE}=1 shows where it was raised)",
            file=sys.stderr,
        )
        return 1 if isinstance(error, TrainingStopped) else 2
    _close_process_group()
    return code


if __name__ == "__main__":
    sys.exit(console())
