"""Run by `tests/test_distributed.py` under `torchrun` (gloo, CPU), with 1 or 2 processes:

    python -m torch.distributed.run --standalone --nproc_per_node N tests/distributed_worker.py WORKDIR GLOBAL_BATCH

In order, each process:
1. `grad`: the ITC loss of a tiny pre-training model on its share of a fixed global batch, back-propagated,
   the gradients averaged across processes as DDP does; rank 0 saves the loss and the gradients.
2. `distill`: the `efficientvlm distill` command (pre-training collator, tiny teacher and student) for 2 steps.
3. `prune`: the `efficientvlm prune` command on retrieval (ITC + ITM, with a teacher and the ITC KD term) for 2
   steps, with an evaluation.
With `resume COMMAND PHASE` after those arguments, it runs only `COMMAND` (`distill`, `prune`, or both in one launch:
`distill+prune`) for 4 steps with a checkpoint at every step: `full` uninterrupted; `killed` stopping (asleep, for
the test to SIGKILL) once `checkpoint-3` is written (mid-epoch: 2 steps per epoch); `resumed` from that checkpoint.
`WORKER_TRAINER_FLAGS` (environment) adds Trainer flags to every command, e.g. `--deepspeed ds.json`.
Each process saves, outside the output folders, its weights (and pruning state) after training (under ZeRO-3 /
FSDP the whole weights, gathered into rank 0; rank 1 saves None), the files it
opened for writing under the output folders, and how many evaluations it ran. `WORKDIR` holds the data and the
teacher folders, which the test writes first.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

torch.set_num_threads(1)
# A process that aborts (SIGABRT from C++, e.g. a gloo thread at teardown) prints where every Python thread was.
faulthandler.enable(all_threads=True)

WORKDIR, GLOBAL_BATCH = Path(sys.argv[1]), int(sys.argv[2])
RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
RESULTS = WORKDIR / (f"results_{WORLD}" if "resume" not in sys.argv else "results_resume")
OUTPUTS = WORKDIR / f"outputs_{WORLD}"
WRITES: list[str] = []


def _record_writes(event: str, args: tuple) -> None:
    """Audit hook: every path under OUTPUTS this process opens for writing, creates, renames or removes."""
    path = None
    if event == "open" and args and isinstance(args[0], (str, os.PathLike)):
        mode, flags = args[1], args[2]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        path = args[0] if writing else None
    elif event in ("os.mkdir", "os.rename", "os.remove", "shutil.rmtree", "os.symlink"):
        path = args[0]
    if path is not None and str(Path(os.fspath(path)).absolute()).startswith(str(OUTPUTS.absolute())):
        WRITES.append(f"{event} {os.fspath(path)}")


def _patch_native_writers() -> None:
    """`torch.save` and safetensors write through native code, which the audit hook does not see."""
    import safetensors.torch

    for module, name in ((torch, "save"), (safetensors.torch, "save_file")):
        original = getattr(module, name)

        def wrapper(obj, f, *args, _original=original, _name=name, **kwargs):
            if isinstance(f, (str, os.PathLike)) and str(Path(f).absolute()).startswith(str(OUTPUTS.absolute())):
                WRITES.append(f"{_name} {os.fspath(f)}")
            return _original(obj, f, *args, **kwargs)

        setattr(module, name, wrapper)


def _dump(name: str, obj) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.save(obj, RESULTS / f"{name}_rank{RANK}.pt")


def itc_gradients() -> None:
    from modeling_efficientvlm import EfficientVLMForPreTraining
    from tests.distributed_reference import itc_batch, itc_model

    model: EfficientVLMForPreTraining = itc_model()
    batch = itc_batch(model.config, GLOBAL_BATCH)
    local = GLOBAL_BATCH // WORLD
    inputs = {key: value[RANK * local : (RANK + 1) * local] for key, value in batch.items()}

    def averaged_gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = model(**inputs).loss_itc
        loss.backward()
        grads = {}
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)  # what DDP does: the mean over processes
                grads[name] = parameter.grad / WORLD
        model.zero_grad(set_to_none=True)
        return loss, grads

    loss, grads = averaged_gradients()
    model.config.itc_local_gradient = True  # X-VLM's gather: each process's own slice of the gradient
    _, local_grads = averaged_gradients()
    model.config.itc_local_gradient = False
    # Uneven local batches (3 and 5 rows): gathered in rank order; the backward sums every process's gradient.
    from modeling_efficientvlm.loss_efficientvlm import gather_batch

    local = torch.arange(2.0 * (3 + 2 * RANK)).view(-1, 2).add(100 * RANK).requires_grad_()
    gathered = gather_batch(local)
    (gathered * torch.arange(gathered.numel()).view_as(gathered)).sum().backward()
    uneven = {"gathered": gathered.detach(), "grad": local.grad}
    _dump("grad", {"loss_itc": loss.detach(), "grads": grads, "local_grads": local_grads, "uneven": uneven})


def install_trainer_probes() -> None:
    """Saves each process's weights (and pruning state) after training, and counts evaluations."""
    import trainers.training
    from trainers.distillation.trainer import DistillationTrainer
    from trainers.pruning.trainer import ModalAdaptivePruningTrainer
    from trainers.sharding import whole_model

    original_train = DistillationTrainer.train

    def train(self, *args, **kwargs):
        if RESUME and RESUME[1] == "killed":
            self.add_callback(StopAfterCheckpoint())
        result = original_train(self, *args, **kwargs)
        # The whole weights (under ZeRO-3 / FSDP gathered into rank 0; None in the others).
        model = whole_model(self)
        state = None if model is None else {k: v.detach().clone() for k, v in model.state_dict().items()}
        pruning = self.pruning_state_dict() if isinstance(self, ModalAdaptivePruningTrainer) else None
        _dump(CURRENT[0], {"weights": state, "pruning": pruning, "log_history": self.state.log_history})
        return result

    DistillationTrainer.train = train
    original_evaluate = trainers.training.evaluate_task

    def evaluate_task(*args, **kwargs):
        EVALUATIONS.append(CURRENT[0])
        return original_evaluate(*args, **kwargs)

    trainers.training.evaluate_task = evaluate_task


class StopAfterCheckpoint(TrainerCallback):
    """Once checkpoint 3 is written, says so (with this process's pid) and waits to be killed."""

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 3:
            dist.barrier()  # every process has written its part of the checkpoint
            (WORKDIR / f"killable_rank{RANK}").write_text(str(os.getpid()))
            time.sleep(600)


RESUME = sys.argv[3:] if len(sys.argv) > 3 and sys.argv[3] == "resume" else []
RESUME = RESUME[1:]
# Extra Trainer flags for every command, e.g. `--deepspeed ds.json` (space-separated; no spaces inside a flag).
ENGINE_FLAGS = os.environ.get("WORKER_TRAINER_FLAGS", "").split()
CURRENT: list[str] = [""]
EVALUATIONS: list[str] = []


def common_flags(output_dir: Path, command: str) -> list[str]:
    if RESUME:
        phase = RESUME[1]
        output_dir = WORKDIR / f"resume_{phase if phase == 'full' else 'killed'}" / command
        flags = ["--save_strategy", "steps", "--save_steps", "1", "--max_steps", "4"]
        if phase == "resumed":
            flags += ["--resume_from_checkpoint", str(output_dir / "checkpoint-3")]
    else:
        flags = ["--save_strategy", "no", "--max_steps", "2"]
    return [
        *flags,
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", str(GLOBAL_BATCH // WORLD),
        "--logging_steps", "1",
        "--learning_rate", "1e-3",
        "--seed", "0",
        "--report_to", "none",
        "--use_cpu",
        "--disable_tqdm", "true",
        "--dataloader_num_workers", "0",
        *ENGINE_FLAGS,
    ]  # fmt: skip


def distill() -> None:
    from trainers import commands as cli

    CURRENT[0] = "distill" if not RESUME else f"distill_{RESUME[1]}"
    from tests.distributed_reference import distill_flags

    argv = ["distill", *distill_flags(WORKDIR), *common_flags(OUTPUTS / "distill", "distill")]
    cli.main(argv)


def prune() -> None:
    from trainers import commands as cli

    CURRENT[0] = "prune" if not RESUME else f"prune_{RESUME[1]}"
    argv = [
        "prune",
        "--task", "retrieval",
        "--model_name_or_path", str(WORKDIR / "retrieval_teacher"),
        "--teacher_model_name_or_path", str(WORKDIR / "retrieval_teacher"),
        "--train_file", str(WORKDIR / "image_text.json"),
        "--eval_file", str(WORKDIR / "image_text.json"),
        "--image_root", str(WORKDIR / "images"),
        "--target_sparsity", "0.3",
        "--sparsity_warmup_steps", "1",
        "--mask_learning_rate", "0.5",
        "--kd_term_weights", '{"itc": 1.0, "vision_attn": 0.0, "text_attn": 0.0, "fusion_attn": 0.0}',
        *common_flags(OUTPUTS / "prune", "prune"),
    ]  # fmt: skip
    cli.main(argv)


def force_fsdp_on_cpu() -> None:
    """accelerate enables FSDP only on accelerators (a CPU run with `--fsdp` trains with DDP): with
    `WORKER_FSDP_ON_CPU=1` its state takes the FSDP plugin on CPU too, as it does on GPUs."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # Both shared states: a later `AcceleratorState()` takes the type from `PartialState`.
            PartialState().distributed_type = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = __init__


def _finish() -> None:
    """Ends the worker once every process is done: barrier, group torn down, then out without the interpreter's
    teardown. Under load a rank sometimes aborted in that teardown ("terminate called without an active
    exception", SIGABRT, in a thread with no Python frame: a C++ thread destroyed at exit) after its work was
    written, failing the test over nothing the test checks; everything the test reads is on disk by now."""
    dist.barrier()  # none tears the group down while a peer still uses it (process 0 saves last)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    dist.init_process_group("gloo")
    if os.environ.get("WORKER_FSDP_ON_CPU") == "1":
        force_fsdp_on_cpu()
    if RESUME:
        install_trainer_probes()
        for command in RESUME[0].split("+"):
            {"distill": distill, "prune": prune}[command]()
        _finish()
    itc_gradients()
    if RANK != 0:
        sys.addaudithook(_record_writes)
        _patch_native_writers()
    install_trainer_probes()
    distill()
    prune()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"probes_rank{RANK}.json").write_text(json.dumps({"writes": WRITES, "evaluations": EVALUATIONS}))
    _finish()
