"""The `efficientvlm` command: help texts and the pretrain -> finetune -> evaluate -> benchmark path on real files."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers import commands as cli
from trainers.demo.corpus import generate_demo_data, write_demo_vocab


def test_top_level_help_lists_every_stage(capsys) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    stages = ("processor", "pretrain", "finetune", "distill", "prune", "evaluate", "benchmark", "convert", "demo")
    stages += ("recipes",)
    for command in stages:
        assert command in out
    assert cli.main(["compress"]) == 2
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("processor", "--train_files"),
        ("pretrain", "--preset"),
        ("finetune", "--task"),
        ("distill", "--teacher_model_name_or_path"),
        ("prune", "--target_sparsity"),
        ("evaluate", "--eval_file"),
        ("benchmark", "--models"),
        ("convert", "--checkpoint"),
        ("demo", "--quick"),
        ("recipes", "name"),
    ],
)
def test_each_subcommand_has_useful_help(command: str, expected: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: efficientvlm {command} ")
    assert expected in out


def _console_script(*argv: str) -> subprocess.CompletedProcess:
    """Runs the installed `efficientvlm` script on this checkout's code (PYTHONPATH kept, the checkout first)."""
    script = shutil.which("efficientvlm")
    assert script is not None, "the `efficientvlm` console script is not on PATH: install the package (README)"
    return subprocess.run([script, *argv], capture_output=True, text=True, timeout=300, env=_script_env())


def _script_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def test_console_script_is_installed() -> None:
    completed = _console_script("--help")
    assert completed.returncode == 0 and "usage: efficientvlm" in completed.stdout


def test_commands_drop_deepspeeds_cpu_notice_where_torch_sees_no_accelerator() -> None:
    """Transformers' Trainer imports DeepSpeed, which warned "Setting accelerator to CPU. If you have GPU or other
    accelerator, we were unable to detect it." on every CPU-only training run; the commands drop that one line."""
    notice = "Setting accelerator to CPU"
    script = "import deepspeed, logging; logging.getLogger('DeepSpeed').warning('kept: other warnings')"
    for before, expected in (("", 1), ("from trainers.commands import main; main(['recipes']); ", 0)):
        done = subprocess.run(
            [sys.executable, "-c", before + script], capture_output=True, text=True, timeout=120, env=_script_env()
        )
        assert done.returncode == 0, done.stderr[-3000:]
        printed = done.stdout + done.stderr
        assert printed.count(notice) == expected and "kept: other warnings" in printed, (before, printed[-2000:])


def test_the_deepspeed_notice_is_judged_by_cuda_on_a_torch_without_torch_accelerator(monkeypatch) -> None:
    """torch < 2.6 has no `torch.accelerator` (setup.py allows torch >= 2.4): CUDA alone decides there."""
    import logging

    import torch

    from trainers import commands

    logger = logging.getLogger("DeepSpeed")
    monkeypatch.setattr(logger, "filters", [])
    monkeypatch.delattr(torch, "accelerator")
    for cuda, dropped in ((True, False), (False, True)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        commands._drop_deepspeed_cpu_notice()
        record = logging.LogRecord(
            "DeepSpeed", logging.WARNING, __file__, 1, "Setting accelerator to CPU. ...", (), None
        )
        assert logger.filter(record) is not dropped


def test_the_console_entry_point_ends_a_torchrun_process_group_cleanly(tmp_path) -> None:
    """Under torchrun the script tears the process group down itself (after a barrier) once the command is done:
    left to interpreter shutdown, a gloo group can abort a process (SIGABRT) whose peer is still saving."""
    script = f"""
import sys
import torch.distributed as dist
from trainers import commands
dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
sys.argv = ["efficientvlm", "recipes"]
code = commands.console()
print("initialized after:", dist.is_initialized(), "code:", code)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=_script_env()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "small-cpu" in done.stdout and done.stdout.strip().endswith("initialized after: False code: 0")


def test_benchmark_preset_against_randomly_pruned_copies(capsys, tmp_path) -> None:
    import torch

    from trainers.commands import benchmark

    fast = ["--batch_sizes", "1,2", "--text_length", "8", "--warmup", "1", "--repeats", "1", "--rounds", "1"]
    threads = torch.get_num_threads()
    outputs = ["--output_json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")]
    report = benchmark.main(["--preset", "tiny", "--random_prune", "0.35,0.5", "--threads", "1", *fast, *outputs])
    assert torch.get_num_threads() == threads
    rows = report.rows("encoders")
    assert [(row.name, row.batch_size) for row in rows] == [
        (name, batch) for batch in (1, 2) for name in ("tiny", "tiny pruned 0.35", "tiny pruned 0.5")
    ]
    assert rows[0].parameters > rows[1].parameters > rows[2].parameters
    assert rows[0].gflops > rows[1].gflops > rows[2].gflops
    printed = capsys.readouterr()
    out = printed.out
    # A line on stderr per setting as it starts (a long run printed nothing for minutes).
    assert [line for line in printed.err.splitlines() if line.startswith("benchmark: ")] == [
        f"benchmark: setting {i}/2: encoders, batch {i}, the models' image size, 1 thread(s), 3 model(s) x 1 round(s)"
        for i in (1, 2)
    ]
    assert "| encoders | tiny pruned 0.35 | 1 | 32 | 1 |" in out
    assert "tiny pruned 0.5: random masks, sparsity 0.5" in out
    assert len(json.loads((tmp_path / "b.json").read_text())["results"]) == 6 and (tmp_path / "b.png").is_file()
    for bad, message in [
        ([], "Give the models"),
        (["--preset", "tiny", "--random_prune", "0.5,1.2"], r"\(0, 1\)"),
        (["--models", "clip-b16", "--random_prune", "0.5"], "--random_prune prunes copies of presets"),
        (["--preset", "tiny", "--batch_sizes", "1,x"], "--batch_sizes"),
        (["--preset", "tiny", "--prune_pad_multiple", "8,0"], "--prune_pad_multiple must be integers >= 1"),
        (["--preset", "tiny", "--workload", "itm,speed"], "Unknown workload"),
        (["--models", "tiny", "./no/such/folder"], r"--models './no/such/folder': no such folder"),
    ]:
        with pytest.raises(ValueError, match=message):
            benchmark.main(bad)


def test_console_script_prints_an_input_error_as_one_message() -> None:
    bad = ("evaluate", "--task", "vqa", "--model_name_or_path", "./no/such/model", "--eval_file", "x.json")
    completed = _console_script(*bad)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert completed.stderr.startswith(
        "efficientvlm evaluate: error: --model_name_or_path './no/such/model': no such folder"
    )
    env = {**_script_env(), "EFFICIENTVLM_TRACEBACK": "1"}
    script = shutil.which("efficientvlm")
    traced = subprocess.run([script, *bad], capture_output=True, text=True, timeout=300, env=env)
    assert traced.returncode == 1 and "Traceback (most recent call last)" in traced.stderr


def test_a_checkpoint_write_that_fails_prints_as_one_message(monkeypatch, capsys) -> None:
    """A full disk under a checkpoint's torch.save gave torch's raw traceback ("[enforce fail at inline_container.cc]
    . unexpected pos ..."), with no word of what happened; other RuntimeErrors keep theirs."""
    from trainers import commands

    def save_to_a_full_disk() -> int:
        torch.save({"state": torch.zeros(100_000)}, "/dev/full")  # every write fails: no space left
        return 0

    monkeypatch.setattr(commands, "main", save_to_a_full_disk)
    monkeypatch.setattr(sys, "argv", ["efficientvlm", "finetune"])
    assert commands.console() == 2
    err = capsys.readouterr().err
    assert err.startswith("efficientvlm finetune: error: writing a file failed ([enforce fail at inline_container")
    assert "the disk is full or the file cannot be written" in err and "Traceback" not in err

    def fail_otherwise() -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(commands, "main", fail_otherwise)
    with pytest.raises(RuntimeError, match="^a bug$"):
        commands.console()


def test_console_script_runs_the_benchmark_of_randomly_pruned_copies() -> None:
    fast = ["--batch_sizes", "1", "--text_length", "8", "--warmup", "0", "--repeats", "1", "--rounds", "1"]
    completed = _console_script(
        "benchmark", "--workload", "itm", "--preset", "tiny", "--random_prune", "0.5", "--threads", "1", *fast
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("| workload | model | batch | image px | threads |")
    assert any(line.startswith("| itm | tiny | 1 | 32 | 1 | ") for line in lines)
    assert any(line.startswith("| itm | tiny pruned 0.5 | 1 | 32 | 1 | ") for line in lines)


def test_pretrain_finetune_evaluate_benchmark_on_files(tmp_path, capsys) -> None:
    data = generate_demo_data(tmp_path / "data", quick=True, num_train_images=40, num_eval_images=12)
    vocab = write_demo_vocab(tmp_path / "vocab.txt")
    common = ["--per_device_train_batch_size", "8", "--report_to", "none", "--use_cpu", "--save_strategy", "no"]
    overrides = json.dumps(
        {"vision_config": {"image_size": 64}, "text_config": {"vocab_size": 200, "max_position_embeddings": 64}}
    )
    cli.main(
        [
            "pretrain",
            "--preset",
            "tiny",
            "--config_overrides",
            overrides,
            "--vocab_file",
            str(vocab),
            "--train_file",
            str(data.pretrain),
            "--image_root",
            str(data.image_root),
            "--max_text_length",
            "40",
            "--output_dir",
            str(tmp_path / "pretrained"),
            "--max_steps",
            "3",
            *common,
        ]
    )
    assert (tmp_path / "pretrained" / "model.safetensors").is_file()
    assert (tmp_path / "pretrained" / "processor_config.json").is_file()

    cli.main(
        [
            "finetune",
            "--task",
            "nlvr2",
            "--model_name_or_path",
            str(tmp_path / "pretrained"),
            "--train_file",
            str(data.nlvr2_train),
            "--eval_file",
            str(data.nlvr2_test),
            "--image_root",
            str(data.image_root),
            "--output_dir",
            str(tmp_path / "nlvr2"),
            "--max_steps",
            "3",
            *common,
        ]
    )
    results = json.loads((tmp_path / "nlvr2" / "eval_results.json").read_text())
    assert 0 <= results["nlvr2_accuracy"] <= 1

    cli.main(
        [
            "evaluate",
            "--task",
            "nlvr2",
            "--model_name_or_path",
            str(tmp_path / "nlvr2"),
            "--eval_file",
            str(data.nlvr2_test),
            "--image_root",
            str(data.image_root),
            "--output_file",
            str(tmp_path / "again.json"),
            "--predictions_file",
            str(tmp_path / "nlvr2_predictions.json"),
        ]
    )
    assert json.loads((tmp_path / "again.json").read_text()) == results
    items = json.loads((tmp_path / "nlvr2_predictions.json").read_text())
    assert len(items) == len(json.loads(Path(data.nlvr2_test).read_text()))
    accuracy = sum(item["prediction"] == item["label"] for item in items) / len(items)
    assert accuracy == pytest.approx(results["nlvr2_accuracy"])

    capsys.readouterr()
    cli.main(["benchmark", "--models", str(tmp_path / "pretrained"), str(tmp_path / "nlvr2"), "--repeats", "2"])
    table = capsys.readouterr().out
    assert "| workload | model | batch | image px | threads | params (M) | encoder params (M) |" in table
    assert "1.00x" in table
    assert "UNEXPECTED" not in table and "Loading weights" not in table


def test_prune_writes_a_complete_folder_that_evaluate_reads(tmp_path) -> None:
    from .data_utils import COLOURS, write_vocab, write_vqa_json

    records, image_root = write_vqa_json(tmp_path, n=6)
    answer_list = tmp_path / "answer_list.json"
    answer_list.write_text(json.dumps(COLOURS))
    output = tmp_path / "pruned"
    data = ["--train_file", str(records), "--image_root", str(image_root), "--answer_list", str(answer_list)]
    cli.main(
        [
            "prune",
            "--task",
            "vqa",
            "--preset",
            "tiny",
            "--vocab_file",
            str(write_vocab(tmp_path)),
            *data,
            "--target_sparsity",
            "0.3",
            "--output_dir",
            str(output),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "3",
            "--report_to",
            "none",
            "--use_cpu",
            "--save_strategy",
            "no",
        ]
    )
    for name in ("model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "pruning_report.json"):
        assert (output / name).is_file(), name
    card = (output / "README.md").read_text()
    assert "license: apache-2.0" in card and "## Modal-adaptive pruning" in card and "<" not in card

    # `efficientvlm evaluate` needs the processor in the folder.
    results = tmp_path / "results.json"
    evaluate_args = ["--model_name_or_path", str(output), "--eval_file", *data[1:], "--output_file", str(results)]
    cli.main(["evaluate", "--task", "vqa", *evaluate_args])
    assert 0 <= json.loads(results.read_text())["vqa_accuracy"] <= 1

    # Per-item predictions; without --answer_list the candidates saved with the pruned model are ranked.
    predictions = tmp_path / "predictions.json"
    no_answer_list = [arg for arg in evaluate_args if arg not in ("--answer_list", str(answer_list))]
    cli.main(["evaluate", "--task", "vqa", *no_answer_list, "--predictions_file", str(predictions)])
    items = json.loads(predictions.read_text())
    references = [record["answer"] for record in json.loads(records.read_text())]
    assert [item["answers"] for item in items] == references
    assert all(item["prediction"] in COLOURS and 0 <= item["vqa_accuracy"] <= 1 for item in items)
    mean = sum(item["vqa_accuracy"] for item in items) / len(items)
    assert mean == pytest.approx(json.loads(results.read_text())["vqa_accuracy"])


def test_evaluate_runs_the_model_on_the_device_and_in_the_dtype_asked_for(tmp_path, monkeypatch) -> None:
    from trainers.commands import evaluate as evaluate_command

    from .data_utils import write_vocab, write_vqa_json

    records, image_root = write_vqa_json(tmp_path, n=4)
    folder = tmp_path / "model"
    cli.main(
        ["finetune", "--task", "vqa", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
        + ["--train_file", str(records), "--image_root", str(image_root), "--answer_list", "auto"]
        + ["--output_dir", str(folder), "--max_steps", "1", "--per_device_train_batch_size", "2"]
        + ["--report_to", "none", "--use_cpu", "--save_strategy", "no"]
    )
    seen, packs, kernels = [], [], []

    def spy(task, model, *args, **kwargs):
        seen.append((next(model.parameters()).dtype, next(model.parameters()).device.type))
        packs.append(any(getattr(module, "cpu_packs", None) is not None for module in model.modules()))
        kernels.append(model.config.vision_config._attn_implementation == "efficientvlm_cpu")
        return evaluate_task(task, model, *args, **kwargs)

    evaluate_task = evaluate_command.evaluate_task
    monkeypatch.setattr(evaluate_command, "evaluate_task", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["--task", "vqa", "--model_name_or_path", str(folder), "--eval_file", str(records)]
    base += ["--image_root", str(image_root)]
    float32 = evaluate_command.main([*base])
    bfloat16 = evaluate_command.main([*base, "--dtype", "bfloat16", "--device", "cpu"])
    assert seen == [(torch.float32, "cpu"), (torch.bfloat16, "cpu")]  # `auto` is the CPU without a GPU
    assert 0 <= bfloat16["vqa_accuracy"] <= 1 and set(bfloat16) == set(float32)
    assert evaluate_command.main([*base, "--pack_cpu_weights", "true"]) == float32
    assert packs == [False, False, True]
    with pytest.raises(ValueError, match="--pack_cpu_weights is for float32 on the CPU; got --device 'cpu'"):
        evaluate_command.main([*base, "--pack_cpu_weights", "true", "--dtype", "bfloat16", "--device", "cpu"])
    assert evaluate_command.main([*base, "--cpu_attention_kernel", "true"]) == float32
    assert kernels == [False, False, False, True]
    with pytest.raises(ValueError, match="--cpu_attention_kernel is for float32 on the CPU"):
        evaluate_command.main([*base, "--cpu_attention_kernel", "true", "--dtype", "bfloat16", "--device", "cpu"])
    with pytest.raises(ValueError, match="--dtype float16 runs on CUDA only"):
        evaluate_command.main([*base, "--dtype", "float16"])
    with pytest.raises(ValueError, match="--device 'cuda': torch .* sees no CUDA device"):
        evaluate_command.main([*base, "--device", "cuda"])

    # A test split (no answers): answered unscored, the predictions written into a folder made for them.
    unanswered = [{k: v for k, v in r.items() if k != "answer"} for r in json.loads(records.read_text())]
    (tmp_path / "test.json").write_text(json.dumps(unanswered))
    predictions = tmp_path / "new" / "folder" / "predictions.json"
    test = ["--eval_file", str(tmp_path / "test.json"), "--predictions_file", str(predictions)]
    assert evaluate_command.main([*base[:4], "--image_root", str(image_root), *test]) == {}
    items = json.loads(predictions.read_text())
    assert [item["question_id"] for item in items] == [100, 101, 102, 103]
    assert all(item["prediction"] and item["vqa_accuracy"] is None for item in items)
    # Some questions without answers: which is named, before the model runs.
    (tmp_path / "mixed.json").write_text(json.dumps([*json.loads(records.read_text())[:2], *unanswered[2:]]))
    mixed = [*base[:4], "--image_root", str(image_root), "--eval_file", str(tmp_path / "mixed.json")]
    with pytest.raises(ValueError, match=r"Record 2 in .*mixed.json has no answers, but other questions"):
        evaluate_command.main(mixed)
    # Another task's checkpoint: its head would be scored untrained.
    nlvr2 = ["--task", "nlvr2", "--model_name_or_path", str(folder), "--eval_file", str(records)]
    with pytest.raises(ValueError, match=r"--task nlvr2: .* checkpoint of EfficientVLMForQuestionAnswering, without"):
        evaluate_command.main(nlvr2)
    # Fine-tuning with such an eval split fails before training, not after it.
    finetune = ["finetune", "--task", "vqa", "--model_name_or_path", str(folder), "--train_file", str(records)]
    finetune += ["--image_root", str(image_root), "--output_dir", str(tmp_path / "never"), "--report_to", "none"]
    with pytest.raises(ValueError, match=r"--eval_file: Record 0 in .*test.json has no answers \(4 of 4"):
        cli.main([*finetune, "--eval_file", str(tmp_path / "test.json"), "--use_cpu"])
    (image_root / "broken.png").write_text("not an image")
    broken = json.loads(records.read_text())
    broken[1]["image"] = "broken.png"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"Record 1 in .*broken.json: cannot read image .*broken.png"):
        cli.main([*finetune, "--eval_file", str(tmp_path / "broken.json"), "--use_cpu"])
    assert not (tmp_path / "never").exists()


def test_every_command_takes_num_threads_and_cpu_runs_do_not_pin_memory(tmp_path, monkeypatch) -> None:
    import torch
    from transformers import TrainingArguments

    from trainers.commands.common import DataArguments, ModelArguments, parse_arguments

    threads = torch.get_num_threads()
    try:
        model_args, _, training_args = parse_arguments(
            "finetune",
            (ModelArguments, DataArguments, TrainingArguments),
            ["--preset", "tiny", "--output_dir", "unused", "--num_threads", "1", "--use_cpu"],
            "test",
        )
        assert torch.get_num_threads() == 1 and model_args.preset == "tiny"
        assert training_args.dataloader_pin_memory is torch.cuda.is_available()
        with pytest.raises(ValueError, match="--num_threads"):
            parse_arguments("finetune", (ModelArguments,), ["--num_threads", "0"], "test")
        # A mistyped folder is named as one, not passed on as a malformed Hub id; Hub ids and model folders pass, and
        # a processor folder (no config.json) as the processor.
        for flag, value in [("--model_name_or_path", "/no/such/folder"), ("--processor_name_or_path", "a/b/c")]:
            with pytest.raises(ValueError, match=f"{flag} '{value}': no such folder"):
                parse_arguments("finetune", (ModelArguments,), [flag, value], "test")
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "config.json").write_text("{}")
        for value in ("org/model", str(tmp_path / "model")):
            (parsed,) = parse_arguments("finetune", (ModelArguments,), ["--model_name_or_path", value], "test")
            assert parsed.model_name_or_path == value
        (parsed,) = parse_arguments("finetune", (ModelArguments,), ["--processor_name_or_path", os.getcwd()], "test")
        assert parsed.processor_name_or_path == os.getcwd()
        # A mistyped bare folder name (or one inside an existing folder) retried the Hub for 23 s offline, then
        # said it could not connect: named as a folder, with the close names beside it.
        os.makedirs(tmp_path / "runs" / "my_teacher")
        monkeypatch.chdir(tmp_path)
        for value, hint in [("my_pretrianed", "$"), ("runs/my_teachr", " Did you mean 'runs/my_teacher'\\?")]:
            with pytest.raises(ValueError, match=f"--model_name_or_path '{value}': no such folder here .*'\\.{hint}"):
                parse_arguments("finetune", (ModelArguments,), ["--model_name_or_path", value], "test")
    finally:
        torch.set_num_threads(threads)


def test_finetune_from_a_preset_is_reproducible_and_kd_flags_need_a_teacher(tmp_path) -> None:
    from safetensors.torch import load_file

    from .data_utils import write_nlvr2_json, write_vocab

    data, image_root = write_nlvr2_json(tmp_path, n=4)
    argv = ["finetune", "--task", "nlvr2", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
    argv += ["--train_file", str(data), "--image_root", str(image_root), "--max_steps", "1", "--seed", "3"]
    argv += ["--report_to", "none", "--use_cpu", "--save_strategy", "no", "--per_device_train_batch_size", "2"]
    for run in ("a", "b"):
        cli.main([*argv, "--output_dir", str(tmp_path / run)])
    first, second = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ValueError, match=r"--kd_weight, --kd_term_weights weigh\(s\) distillation terms: give "):
        cli.main([*argv, "--output_dir", str(tmp_path / "c"), "--kd_weight", "0.9", "--kd_term_weights", "{}"])


def test_a_checkpoint_folder_is_a_model_folder_evaluated_or_trained_under_another_head_rate(tmp_path) -> None:
    """Every checkpoint holds the processor beside the weights: `evaluate` reads it as it reads the final folder, and
    a new run starts from its weights with another `head_learning_rate_multiplier`, which a resume refuses."""
    from .data_utils import write_nlvr2_json, write_vocab

    data, image_root = write_nlvr2_json(tmp_path, n=4)
    common = ["--task", "nlvr2", "--train_file", str(data), "--image_root", str(image_root), "--max_steps", "2"]
    common += ["--report_to", "none", "--use_cpu", "--per_device_train_batch_size", "2", "--save_steps", "1"]
    first = ["finetune", *common, "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
    cli.main([*first, "--output_dir", str(tmp_path / "a")])
    checkpoint = tmp_path / "a" / "checkpoint-1"
    evaluate = ["evaluate", "--task", "nlvr2", "--eval_file", str(data), "--image_root", str(image_root)]
    cli.main([*evaluate, "--model_name_or_path", str(checkpoint), "--output_file", str(tmp_path / "at1.json")])
    assert 0 <= json.loads((tmp_path / "at1.json").read_text())["nlvr2_accuracy"] <= 1
    faster = ["--config_overrides", '{"head_learning_rate_multiplier": 2}']
    with pytest.raises(ValueError, match="trained with head_learning_rate_multiplier 1, but this run sets 2"):
        cli.main([*first, *faster, "--output_dir", str(tmp_path / "a"), "--resume_from_checkpoint", str(checkpoint)])
    cli.main(
        ["finetune", *common, *faster, "--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / "b")]
    )
    assert json.loads((tmp_path / "b" / "config.json").read_text())["head_learning_rate_multiplier"] == 2
    # A checkpoint of an earlier version (weights only): named, not transformers' "Can't load image processor".
    old = tmp_path / "a" / "checkpoint-2"
    (old / "processor_config.json").unlink()
    with pytest.raises(ValueError, match=r"--model_name_or_path \S*checkpoint-2 holds no processor"):
        cli.main([*evaluate, "--model_name_or_path", str(old)])
    with pytest.raises(ValueError, match=r"--model_name_or_path \S*checkpoint-2 holds no processor"):
        cli.main(["finetune", *common, "--model_name_or_path", str(old), "--output_dir", str(tmp_path / "c")])


def test_batches_of_one_image_train_without_itm_negatives(tmp_path) -> None:
    """Several captions of one image (region captions, multi-caption records) fill whole batches, and an epoch may
    end on one pair: no ITM negative exists there, and training goes on (it raised at the end of the epoch)."""
    from .data_utils import write_image_text_json, write_vocab

    records, image_root = write_image_text_json(tmp_path, n=1, captions_per_image=4)  # batches of 3 pairs, then 1
    argv = ["finetune", "--task", "retrieval", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
    argv += ["--train_file", str(records), "--image_root", str(image_root), "--num_train_epochs", "2"]
    argv += ["--per_device_train_batch_size", "3", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    cli.main([*argv, "--use_cpu", "--save_strategy", "steps", "--save_steps", "4", "--logging_steps", "1"])
    state = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)  # 2 epochs x 2 batches, all trained


def test_several_launched_processes_that_would_each_train_alone_are_an_error(monkeypatch) -> None:
    from transformers import TrainingArguments

    from trainers.commands.common import parse_arguments

    # As torchrun on CPUs without --use_cpu: WORLD_SIZE set, but the Trainer would join no process group.
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--output_dir", "shared", "--report_to", "none"]
    with pytest.raises(ValueError, match=r"Launched as 2 processes .* all writing shared: on CPUs add --use_cpu"):
        parse_arguments("finetune", (TrainingArguments,), argv, "test")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parse_arguments("finetune", (TrainingArguments,), argv, "test")[0].world_size == 1


def test_finetune_checks_the_vqa_answer_list_before_training(tmp_path) -> None:
    from .data_utils import write_vocab, write_vqa_json

    data, image_root = write_vqa_json(tmp_path, n=4)
    argv = ["finetune", "--task", "vqa", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
    argv += ["--train_file", str(data), "--eval_file", str(data), "--image_root", str(image_root)]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none", "--use_cpu"]
    with pytest.raises(ValueError, match="--answer_list"):
        cli.main(argv)
    (tmp_path / "answers.json").write_text('{"red": 1}')
    with pytest.raises(ValueError, match="answers.json must hold a non-empty JSON list"):
        cli.main([*argv, "--answer_list", str(tmp_path / "answers.json")])
    with pytest.raises(FileNotFoundError, match="--answer_list"):
        cli.main([*argv, "--answer_list", str(tmp_path / "missing.json")])
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_finetune_with_a_teacher_distils_the_task(tmp_path) -> None:
    from trainers.distillation import DistillationTrainer
    from trainers.training import train as library_train

    from .data_utils import write_nlvr2_json, write_vocab

    records, image_root = write_nlvr2_json(tmp_path, n=8)
    vocab = str(write_vocab(tmp_path))
    common = ["--task", "nlvr2", "--vocab_file", vocab, "--train_file", str(records), "--image_root", str(image_root)]
    common += ["--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu"]
    common += ["--save_strategy", "no", "--logging_steps", "1"]
    cli.main(["finetune", "--preset", "tiny", *common, "--output_dir", str(tmp_path / "teacher")])

    trainers_used = []

    def spy(*args, **kwargs):
        trainer = library_train(*args, **kwargs)
        trainers_used.append(trainer)
        return trainer

    import trainers.training

    original, trainers.training.train = trainers.training.train, spy
    try:
        student = ["--preset", "tiny-student", "--teacher_model_name_or_path", str(tmp_path / "teacher")]
        cli.main(["finetune", *student, *common, "--kd_term_weights", '{"vision_attn": 0}', "--output_dir",
                  str(tmp_path / "student")])  # fmt: skip
    finally:
        trainers.training.train = original
    [trainer] = trainers_used
    assert isinstance(trainer, DistillationTrainer) and trainer.distillation_config.vision_attn == 0
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"kd_task_logit", "kd_vision_hidden"} <= logged  # the NLVR2 spec's terms
    card = (tmp_path / "student" / "README.md").read_text()
    assert "teacher" in card
    with pytest.raises(ValueError, match="teacher_model_name_or_path"):
        from trainers.training import train_task_model

        train_task_model("nlvr2", None, preset="tiny", distillation_config={"kd_weight": 1.0})
    # A teacher of another task would distil its freshly initialised head: refused, in finetune and in prune.
    from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForImageTextRetrieval

    EfficientVLMForImageTextRetrieval(EfficientVLMConfig.from_preset("tiny")).save_pretrained(tmp_path / "retrieval")
    wrong = ["--teacher_model_name_or_path", str(tmp_path / "retrieval")]
    message = r"is a checkpoint of EfficientVLMForImageTextRetrieval, without the nlvr2 weights \(\d+ missing, e\.g\. "
    for command in (
        ["finetune", "--preset", "tiny-student"],
        ["prune", "--model_name_or_path", str(tmp_path / "teacher"), "--target_sparsity", "0.5"],
    ):
        with pytest.raises(ValueError, match=message):
            cli.main([*command, *wrong, *common, "--output_dir", str(tmp_path / "wrong")])
    assert not (tmp_path / "wrong" / "model.safetensors").exists()


def test_answer_list_auto_ranks_the_most_frequent_training_answers(tmp_path) -> None:
    from modeling_efficientvlm import EfficientVLMForQuestionAnswering

    from .data_utils import write_vocab, write_vqa_json

    data, image_root = write_vqa_json(tmp_path, n=4)
    argv = ["finetune", "--task", "vqa", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
    argv += ["--train_file", str(data), "--eval_file", str(data), "--image_root", str(image_root)]
    argv += ["--answer_list", "auto", "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]
    cli.main([*argv, "--report_to", "none", "--use_cpu", "--save_strategy", "no"])
    counts: dict[str, int] = {}
    for record in json.loads(data.read_text()):
        for answer in record["answer"]:
            counts[answer] = counts.get(answer, 0) + 1
    expected = sorted(counts, key=lambda answer: -counts[answer])
    saved = EfficientVLMForQuestionAnswering.from_pretrained(tmp_path / "out").config.answer_candidates
    assert saved[0] == expected[0] and sorted(saved) == sorted(expected)
    assert 0 <= json.loads((tmp_path / "out" / "eval_results.json").read_text())["vqa_accuracy"] <= 1


def test_a_datasets_folder_is_the_training_data_and_eval_file_the_eval_split(tmp_path) -> None:
    import datasets

    from trainers.training import task_dataset, task_inputs

    from .data_utils import COLOURS, make_image, make_processor, write_image_text_json

    processor = make_processor(tmp_path)
    records, image_root = write_image_text_json(tmp_path, n=3)
    columns = {"image": [make_image(colour) for colour in COLOURS[:4]], "caption": ["a", "b", "c", "d"]}
    datasets.Dataset.from_dict(columns).save_to_disk(tmp_path / "hf")
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(columns)}).save_to_disk(tmp_path / "hf_dict")
    train, evaluation, _ = task_inputs(
        "retrieval", None, processor, None, records, image_root, dataset_path=str(tmp_path / "hf")
    )
    assert train.texts == ["a", "b", "c", "d"] and evaluation.source == str(records)
    assert evaluation.texts == task_dataset("retrieval", records, image_root, processor).texts
    with pytest.raises(ValueError, match=r"Give one of --train_file \(.*\) and --dataset_path \(.*hf\) .* not both"):
        task_inputs("retrieval", None, processor, records, None, image_root, dataset_path=str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"--dataset_path .*hf_dict has no 'train' split; it has \['validation'\]"):
        task_inputs("retrieval", None, processor, dataset_path=str(tmp_path / "hf_dict"))
    with pytest.raises(ValueError, match="--answer_list is the candidate answers of VQA; the retrieval task has none"):
        task_inputs("retrieval", None, processor, records, None, image_root, answer_list="auto")
    # Pre-training evaluates nothing: its eval flags are refused rather than ignored.
    argv = ["pretrain", "--preset", "tiny", "--train_file", str(records), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="pretrain evaluates nothing after training: --eval_file would be ignored"):
        cli.main([*argv, "--eval_file", str(records)])
    with pytest.raises(FileNotFoundError, match=r"--vocab_file .*nope.txt: no such file"):
        cli.main([*argv, "--vocab_file", str(tmp_path / "nope.txt")])


def test_answer_list_auto_writes_each_answer_as_the_records_do() -> None:
    from types import SimpleNamespace

    from trainers.training import training_answer_list

    # One answer however written ("two", "2", "Two." normalise alike), spelt as the records spell it most often:
    # the decoder learned to generate "two", and "2" may not be in a vocabulary trained on the records.
    references = [["two", "two", "2"], ["Two.", "a dog", "yes"], ["dog", "yes", "a dog"], [""]]
    assert training_answer_list(SimpleNamespace(references=references)) == ["two", "a dog", "yes"]
    assert training_answer_list(SimpleNamespace(references=references), limit=1) == ["two"]


def test_a_processor_for_another_image_size_is_a_named_error_before_training(tmp_path) -> None:
    from .data_utils import make_processor, write_image_text_json

    processor_dir = tmp_path / "processor64"
    make_processor(tmp_path, image_size=64).save_pretrained(processor_dir)
    data, image_root = write_image_text_json(tmp_path, n=2)
    argv = ["finetune", "--task", "retrieval", "--preset", "tiny", "--processor_name_or_path", str(processor_dir)]
    argv += ["--train_file", str(data), "--image_root", str(image_root), "--output_dir", str(tmp_path / "out")]
    argv += ["--max_steps", "1", "--report_to", "none", "--use_cpu"]
    # The tiny preset's images are 32x32.
    with pytest.raises(ValueError, match=r"64x64 but the model's vision_config\.image_size is 32.*--config_overrides"):
        cli.main(argv)
    assert not (tmp_path / "out").exists()
    from trainers.training import check_image_size

    with pytest.raises(ValueError, match=r"64x64 but .* is 384: give a processor for 384x384 .*--processor_name_or"):
        check_image_size(make_processor(tmp_path, image_size=64), 384)  # a saved model's message
    check_image_size(make_processor(tmp_path, image_size=64), 64)
    # With the model's size set to the processor's, it trains.
    cli.main([*argv, "--config_overrides", '{"vision_config": {"image_size": 64}}', "--save_strategy", "no"])
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_text_limit_longer_than_the_position_table_is_a_named_error_before_training(tmp_path) -> None:
    """A processor keeping 100 tokens for a model with 64 positions was accepted; training then stopped at the
    first batch holding a longer text ("The text has 100 tokens but the model's position table holds 64")."""
    from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForImageTextRetrieval, EfficientVLMForPreTraining
    from trainers.training import check_text_limit

    from .data_utils import make_processor, write_image_text_json, write_vocab, write_vqa_json

    data, image_root = write_image_text_json(tmp_path, n=2)
    vocab, out = str(write_vocab(tmp_path)), tmp_path / "out"
    train = ["--train_file", str(data), "--image_root", str(image_root), "--output_dir", str(out)]
    train += ["--max_steps", "1", "--report_to", "none", "--use_cpu"]
    too_long = r"Texts of up to 100 tokens \(--max_text_length, else the processor's max_length\) do not fit the "
    too_long += r"model's position table of 64 \(text_config\.max_position_embeddings\)"
    # A preset (the tiny one has 64 positions): a shorter limit, or a larger table.
    finetune = ["finetune", "--task", "retrieval", "--preset", "tiny", "--vocab_file", vocab, *train]
    with pytest.raises(ValueError, match=too_long + r".*give --max_text_length <= 64 or a larger table: "):
        cli.main([*finetune, "--max_text_length", "100"])
    # A processor saved with that limit (`efficientvlm processor --max_text_length 100`).
    make_processor(tmp_path, max_length=100).save_pretrained(tmp_path / "processor100")
    pretrain = ["pretrain", "--preset", "tiny", "--processor_name_or_path", str(tmp_path / "processor100"), *train]
    with pytest.raises(ValueError, match=too_long + r".*give --max_text_length <= 64 or a larger table"):
        cli.main(pretrain)
    # A saved model's table is fixed: only a shorter limit helps (finetune and prune build it alike).
    saved = tmp_path / "saved"
    EfficientVLMForPreTraining(EfficientVLMConfig.from_preset("tiny")).save_pretrained(saved)
    make_processor(tmp_path, max_length=100).save_pretrained(saved)
    questions, question_images = write_vqa_json(tmp_path, n=2)
    vqa = ["--task", "vqa", "--model_name_or_path", str(saved), "--train_file", str(questions)]
    vqa += ["--image_root", str(question_images), "--answer_list", "auto", *train[4:]]
    for command in (["finetune"], ["prune", "--target_sparsity", "0.3"]):
        with pytest.raises(ValueError, match=too_long + r".*; give --max_text_length <= 64\.$"):
            cli.main([*command, *vqa])
    distill = ["distill", "--teacher_model_name_or_path", str(saved), "--student_layers", "1,1,1", *train]
    with pytest.raises(ValueError, match=r"Texts of up to 100 tokens \(--max_length, else .* give --max_length <= 64"):
        cli.main(distill)
    assert not out.exists()
    # `evaluate` reads the folder's own processor: named before any text is run.
    retrieval = tmp_path / "retrieval"
    EfficientVLMForImageTextRetrieval(EfficientVLMConfig.from_preset("tiny")).save_pretrained(retrieval)
    make_processor(tmp_path, max_length=100).save_pretrained(retrieval)
    evaluate = ["evaluate", "--task", "retrieval", "--model_name_or_path", str(retrieval), "--eval_file", str(data)]
    with pytest.raises(ValueError, match=r"\(the processor's max_length\) .* max_length to at most 64 in .*retrieval"):
        cli.main([*evaluate, "--image_root", str(image_root)])
    # The limit may reach the table's size: every text, [CLS] and [SEP] included, is cut to it.
    check_text_limit(make_processor(tmp_path, max_length=64), 64)
    with pytest.raises(ValueError, match=r"Texts of up to 65 tokens \(the processor's max_length\) .* table of 64"):
        check_text_limit(make_processor(tmp_path, max_length=64), 64, length=65, flag=None)


def test_a_final_evaluation_that_fails_leaves_the_trained_model_saved(tmp_path) -> None:
    """An eval image whose header reads but whose pixels are cut short passes the check before training and fails
    in the final evaluation: the model is saved first, so the run's training is not lost (it was, and resuming hit
    the same error)."""
    from PIL import Image

    from .data_utils import write_vocab, write_vqa_json

    records_file, image_root = write_vqa_json(tmp_path, n=4)
    records = json.loads(records_file.read_text())
    train, test = tmp_path / "train.json", tmp_path / "test.json"
    train.write_text(json.dumps([records[0], records[2], records[3]]))
    test.write_text(json.dumps(records[:2]))
    path = image_root / "q1.png"
    Image.new("RGB", (64, 64)).save(path)  # a larger image, so that half of it still has a whole header
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    argv = ["finetune", "--task", "vqa", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
    argv += ["--train_file", str(train), "--eval_file", str(test), "--image_root", str(image_root)]
    argv += ["--max_steps", "1", "--per_device_train_batch_size", "1", "--output_dir", str(tmp_path / "out")]
    argv += ["--report_to", "none", "--use_cpu", "--save_strategy", "no", "--answer_list", "auto"]
    with pytest.raises((OSError, ValueError), match="q1.png"):
        cli.main(argv)
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "README.md").is_file()
    assert not (tmp_path / "out" / "eval_results.json").exists()


def test_an_unreadable_training_image_is_named_before_training(tmp_path) -> None:
    """It stopped the run where a batch first read it (step 6 of 20 in an audit), after minutes of training."""
    from .data_utils import write_vocab, write_vqa_json

    records, image_root = write_vqa_json(tmp_path, n=4)
    (image_root / "q2.png").write_bytes(b"not an image")
    argv = ["finetune", "--task", "vqa", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
    argv += ["--train_file", str(records), "--image_root", str(image_root), "--answer_list", "auto"]
    argv += ["--max_steps", "1", "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_cpu"]
    with pytest.raises(ValueError, match=r"Record 2 in .*vqa.json: cannot read image .*q2.png"):
        cli.main(argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("length", [["--num_train_epochs", "1"], ["--max_steps", "2"]])
def test_a_training_split_smaller_than_one_batch_with_drop_last_is_named_before_training(tmp_path, length) -> None:
    """--dataloader_drop_last left no batch: transformers said "args.max_steps must be set to a positive value if
    dataloader does not have a length, was -1" (with --max_steps it ran on nothing), naming neither the split nor
    the batch."""
    from .data_utils import write_vocab, write_vqa_json

    records, image_root = write_vqa_json(tmp_path, n=3)
    argv = ["finetune", "--task", "vqa", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
    argv += ["--train_file", str(records), "--image_root", str(image_root), "--answer_list", "auto", *length]
    argv += ["--per_device_train_batch_size", "8", "--dataloader_drop_last", "true", "--use_cpu"]
    argv += ["--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    message = (
        r"The training split \(\S*vqa.json\) has 3 examples, fewer than one global batch of 8 "
        r"\(--per_device_train_batch_size 8\), and --dataloader_drop_last drops the incomplete batch: no step would "
        r"train\. Leave --dataloader_drop_last out, give --per_device_train_batch_size 3 or less"
    )
    with pytest.raises(ValueError, match=message):
        cli.main(argv)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_training_that_stops_before_its_last_step_saves_no_final_model(tmp_path, monkeypatch, capsys, request) -> None:
    """A SIGTERM under --enable_jit_checkpoint ends training at a checkpoint "gracefully": the commands went on to
    evaluate and save a half-trained model as final and exited 0 (a scheduler read the run as done). The checkpoint
    is that of the end of the step under way (transformers' own callback saved mid-step, labelled the step before)."""
    from transformers import TrainerCallback
    from transformers.testing_utils import CaptureLogger

    import trainers.training
    from trainers import commands
    from trainers.training import TrainingStopped

    from .data_utils import write_image_text_json, write_vocab

    class SigtermDuringTheFirstStep(TrainerCallback):  # a scheduler ending the job
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                os.kill(os.getpid(), signal.SIGTERM)

    original = trainers.training.train
    monkeypatch.setattr(
        trainers.training, "train", lambda *a, **k: original(*a, **k, callbacks=[SigtermDuringTheFirstStep()])
    )
    handler = signal.getsignal(signal.SIGTERM)
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, handler))
    records, image_root = write_image_text_json(tmp_path, n=4)
    argv = ["finetune", "--task", "retrieval", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
    argv += ["--train_file", str(records), "--image_root", str(image_root), "--max_steps", "3", "--use_cpu"]
    argv += ["--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    argv += ["--enable_jit_checkpoint", "true"]
    # An earlier run's checkpoint in the folder: named at the start, and not offered as this run's (it was: the
    # highest-numbered folder, whose resume "finished" the other run's model).
    (tmp_path / "out" / "checkpoint-600").mkdir(parents=True)
    with CaptureLogger(trainers.training.logger) as logged:
        with pytest.raises(
            TrainingStopped, match=r"stopped at step 1 of 3 .* --resume_from_checkpoint \S*checkpoint-1\."
        ):
            cli.main(argv)
    assert "holds 1 checkpoint folder(s) of an earlier run (... checkpoint-600)" in logged.out
    assert sorted(os.listdir(tmp_path / "out" / "checkpoint-1")) and signal.getsignal(signal.SIGTERM) == handler
    assert json.loads((tmp_path / "out" / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1
    assert not (tmp_path / "out" / "model.safetensors").exists()
    # The console script prints it as one message and exits with 1.
    monkeypatch.setattr(sys, "argv", ["efficientvlm", *argv])
    assert commands.console() == 1
    assert "efficientvlm finetune: error: Training stopped at step 1 of 3" in capsys.readouterr().err


def test_a_damaged_checkpoint_is_named_when_resumed(tmp_path) -> None:
    """A checkpoint cut short (weights, or the pruning run's masker.pt) gave a bare safetensors / zip error that named
    no file; the settling trace of a pruning run travels in masker.pt, so a resumed report says the same."""
    import torch
    from transformers.testing_utils import CaptureLogger

    import trainers.training
    from modeling_efficientvlm.loading_efficientvlm import CorruptCheckpointError

    from .data_utils import write_image_text_json, write_vocab

    records, image_root = write_image_text_json(tmp_path, n=4)
    argv = ["prune", "--task", "retrieval", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
    argv += ["--train_file", str(records), "--image_root", str(image_root), "--max_steps", "2", "--use_cpu"]
    argv += ["--per_device_train_batch_size", "4", "--report_to", "none", "--target_sparsity", "0.5"]
    argv += ["--output_dir", str(tmp_path / "out"), "--save_strategy", "steps", "--save_steps", "1"]
    cli.main(argv)
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert torch.load(checkpoint / "masker.pt", weights_only=True)["sparsity_trace"][0][0] == 1
    resume = [*argv, "--resume_from_checkpoint", str(checkpoint)]
    masker = checkpoint / "masker.pt"
    masker.write_bytes(masker.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match=r"Cannot read .*checkpoint-1/masker.pt .*truncated"):
        cli.main(resume)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptCheckpointError, match=r"--resume_from_checkpoint .*checkpoint-1: cannot read .*model"):
        cli.main(resume)
    # The Trainer's own files, cut short or missing, raised bare zip / JSON / "No such file" errors naming none.
    final = tmp_path / "out" / "checkpoint-2"
    damages = {
        "optimizer.pt": lambda path: path.write_bytes(path.read_bytes()[:200]),
        "trainer_state.json": lambda path: path.write_text(path.read_text()[:40]),
        "rng_state.pth": lambda path: path.write_bytes(b""),
    }
    for name, damage in damages.items():
        damaged = tmp_path / f"damaged_{name}"
        shutil.copytree(final, damaged)
        damage(damaged / name)
        with pytest.raises(CorruptCheckpointError, match=rf"damaged_{re.escape(name)}: cannot read \S*/{name} \("):
            cli.main([*argv, "--resume_from_checkpoint", str(damaged)])
    unfinished = tmp_path / "unfinished"  # killed while saving: no trainer_state.json yet
    shutil.copytree(final, unfinished)
    (unfinished / "trainer_state.json").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"unfinished: cannot read \S*/trainer_state.json \(missing\);"):
        cli.main([*argv, "--resume_from_checkpoint", str(unfinished)])
    # Without optimizer state (--save_only_model) the run resumes with a fresh optimizer: said.
    weights_only = tmp_path / "weights_only"
    shutil.copytree(final, weights_only)
    (weights_only / "optimizer.pt").unlink()
    with CaptureLogger(trainers.training.logger) as logged:
        cli.main([*argv, "--resume_from_checkpoint", str(weights_only)])
    assert "weights_only holds no optimizer state (saved with --save_only_model?)" in logged.out
    # Another task's checkpoint: the Trainer loaded what fit and warned.
    captioning = [argv[0], "--task", "captioning", *argv[3:]]
    with pytest.raises(ValueError, match=r"is a checkpoint of EfficientVLMForImageTextRetrieval, but this run trains "):
        cli.main([*captioning, "--resume_from_checkpoint", str(final)])


def test_a_mask_learning_checkpoint_is_refused_as_a_model_and_warned_about_when_loaded(tmp_path) -> None:
    """A pruning run's checkpoint holds the unpruned student and masker.pt: it loaded silently, and export (parity
    OK), evaluate and benchmark took it as the model, without its masks. Now loading it warns, those commands refuse
    it naming the folder and what to do, and resuming the run from it (the Trainer's path) neither warns nor fails."""
    import warnings

    from transformers import AutoModel

    from modeling_efficientvlm.loading_efficientvlm import MASK_STATE_FILE

    from .data_utils import write_image_text_json, write_vocab

    records, image_root = write_image_text_json(tmp_path, n=4)
    argv = ["prune", "--task", "retrieval", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
    argv += ["--train_file", str(records), "--image_root", str(image_root), "--max_steps", "2", "--use_cpu"]
    argv += ["--per_device_train_batch_size", "4", "--report_to", "none", "--target_sparsity", "0.5"]
    argv += ["--save_strategy", "steps", "--save_steps", "1"]
    cli.main([*argv, "--output_dir", str(tmp_path / "out")])
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert (checkpoint / MASK_STATE_FILE).is_file()

    folder, finished = re.escape(str(checkpoint)), re.escape(str(tmp_path / "out"))
    advice = (
        rf"{folder} is a checkpoint of `efficientvlm prune` taken while it learned its masks: .* loads as the unpruned "
        rf"model\. To get the pruned model, finish the run: .*`--resume_from_checkpoint {folder}` saves the pruned "
        rf"model to its --output_dir\. The run has finished already: its pruned model is {finished}\."
    )
    with pytest.warns(UserWarning, match=advice):
        AutoModel.from_pretrained(checkpoint)
    # The pruned model, even with masks an earlier save left beside it: nothing to say.
    shutil.copy(checkpoint / MASK_STATE_FILE, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        AutoModel.from_pretrained(tmp_path / "out")
    given = ["--model_name_or_path", str(checkpoint)]
    for flag, command in (
        ("--model_name_or_path", ["export", *given, "--output_dir", str(tmp_path / "onnx")]),
        ("--model_name_or_path", ["evaluate", "--task", "retrieval", *given, "--eval_file", str(records)]),
        ("--models", ["benchmark", "--models", str(tmp_path / "out"), str(checkpoint)]),
        ("--models", ["app", "--models", str(checkpoint)]),
    ):
        with pytest.raises(ValueError, match=rf"^{flag} {advice}$"):
            cli.main(command)
    assert not (tmp_path / "onnx").exists()

    # Resuming the run from it is what the checkpoint is for.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.main([*argv, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", str(checkpoint)])
    assert not [str(warning.message) for warning in caught if MASK_STATE_FILE in str(warning.message)]
    assert (tmp_path / "resumed" / "pruning_report.json").is_file()


def test_an_answer_list_whose_answers_tokenize_alike_is_refused_before_training(tmp_path) -> None:
    from .data_utils import write_vocab, write_vqa_json

    records, image_root = write_vqa_json(tmp_path, n=2)
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["red", "maybe", "perhaps"]))  # the test vocabulary has neither of the last two
    argv = ["finetune", "--task", "vqa", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
    argv += ["--train_file", str(records), "--image_root", str(image_root), "--answer_list", str(answers)]
    argv += ["--max_steps", "1", "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_cpu"]
    with pytest.raises(ValueError, match=r"--answer_list .*answers.json: 1 candidate answer\(s\) tokenize like"):
        cli.main(argv)
    assert not (tmp_path / "out").exists()


def test_a_vqa_training_file_without_any_answers_is_refused_before_training(tmp_path) -> None:
    """A misspelt `answer` key on every record (or a test split given as --train_file) failed at the first batch,
    naming neither the file nor the key."""
    from .data_utils import write_vocab, write_vqa_json

    records_file, image_root = write_vqa_json(tmp_path, n=2)
    records = [{("anwsers" if key == "answer" else key): value for key, value in r.items()} for r in json.loads(
        records_file.read_text())]  # fmt: skip
    records_file.write_text(json.dumps(records))
    argv = ["finetune", "--task", "vqa", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
    argv += ["--train_file", str(records_file), "--image_root", str(image_root), "--answer_list", "auto"]
    argv += ["--max_steps", "1", "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_cpu"]
    message = (
        rf"^{re.escape(str(records_file))}: none of its 2 questions has answers \(the fields of record 0: .*'anwsers'"
    )
    with pytest.raises(ValueError, match=message):
        cli.main(argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["evaluate", "processor", "export", "convert", "benchmark", "demo", "app"])
def test_a_single_process_command_launched_as_several_processes_is_refused(monkeypatch, tmp_path, command) -> None:
    """Each process evaluated the whole split (processor, export: wrote the whole folder) and wrote the same output
    files at the same time; only the training commands join a launcher's processes."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=rf"^{command} runs in one process; it was launched as 2 \(WORLD_SIZE=2\)"):
        cli.main([command, "--output_dir", "out"])
    assert not any(tmp_path.iterdir())
    from trainers.commands import evaluate

    with pytest.raises(ValueError, match=r"^evaluate runs in one process"):  # called from Python too
        evaluate.main(["--task", "vqa", "--model_name_or_path", "org/m", "--eval_file", "x.json"])


def test_eval_strategy_evaluates_the_eval_file_during_training(tmp_path) -> None:
    """--eval_strategy failed with "you didn't pass an eval_dataset" although --eval_file was given, so
    --load_best_model_at_end (and the pruning trainer's best-checkpoint masks) could not be reached."""
    from .data_utils import write_nlvr2_json, write_vocab

    records, image_root = write_nlvr2_json(tmp_path, n=4)
    argv = ["prune", "--task", "nlvr2", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
    argv += ["--train_file", str(records), "--image_root", str(image_root), "--max_steps", "2", "--use_cpu"]
    argv += ["--per_device_train_batch_size", "4", "--report_to", "none", "--target_sparsity", "0.3"]
    argv += ["--eval_strategy", "steps", "--eval_steps", "1", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="--eval_strategy steps evaluates during training: give --eval_file"):
        cli.main(argv)
    argv += ["--eval_file", str(records), "--save_strategy", "steps", "--save_steps", "1"]
    cli.main([*argv, "--load_best_model_at_end", "true"])
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "eval_loss" in entry] == [1, 2]
    assert state["best_model_checkpoint"] is not None and (tmp_path / "out" / "model.safetensors").is_file()
    # pretrain and distill have no eval split (pretrain refuses --eval_file): said before any model loads, not by the
    # Trainer after, asking for an --eval_file the command does not take.
    flags = ["--eval_strategy", "steps", "--output_dir", str(tmp_path / "none")]
    data = ["--train_file", str(tmp_path / "missing.json")]  # never read: the flags are refused first
    for command in (
        ["pretrain", "--preset", "tiny", *data],
        ["distill", "--teacher_model_name_or_path", "org/t", *data],
    ):
        with pytest.raises(ValueError, match=rf"^--eval_strategy steps: {command[0]} has no eval split to evaluate"):
            cli.main([*command, *flags])


def test_evaluate_names_the_tasks_it_scores_for_a_mistyped_task() -> None:
    """The registry's error offered `pretraining`, which `evaluate` then refused as having no evaluation routine."""
    argv = ["evaluate", "--task", "retreival", "--model_name_or_path", "org/m", "--eval_file", "x.json"]
    with pytest.raises(
        ValueError, match=r"^--task 'retreival': evaluate scores one of vqa, retrieval, nlvr2, captioning\.$"
    ):
        cli.main(argv)


def test_resuming_a_checkpoint_of_the_last_step_trains_no_more(tmp_path) -> None:
    """Resuming `checkpoint-3` of a 3-step run (mid-epoch: 2 steps per epoch) trained a 4th step and saved
    `checkpoint-4` (transformers 5 starts the epoch's remaining steps before checking max_steps); now the run ends
    at once and saves the checkpoint's model as the final one."""
    from safetensors.torch import load_file

    from .data_utils import write_nlvr2_json, write_vocab

    data, image_root = write_nlvr2_json(tmp_path, n=8)
    argv = ["finetune", "--task", "nlvr2", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
    argv += ["--train_file", str(data), "--image_root", str(image_root), "--max_steps", "3", "--save_steps", "3"]
    argv += [
        "--report_to",
        "none",
        "--use_cpu",
        "--per_device_train_batch_size",
        "4",
        "--output_dir",
        str(tmp_path / "o"),
    ]
    cli.main(argv)
    (tmp_path / "o" / "model.safetensors").unlink()  # as if the run was stopped after its last checkpoint
    cli.main([*argv, "--resume_from_checkpoint", str(tmp_path / "o" / "checkpoint-3")])
    assert sorted(path.name for path in (tmp_path / "o").glob("checkpoint-*")) == ["checkpoint-3"]
    final, checkpoint = (
        load_file(tmp_path / "o" / name) for name in ("model.safetensors", "checkpoint-3/model.safetensors")
    )
    assert final.keys() == checkpoint.keys() and all(torch.equal(final[key], checkpoint[key]) for key in final)


def test_a_whole_task_model_load_replaces_transformers_report_with_its_error_and_keeps_it_otherwise(
    tmp_path, monkeypatch
) -> None:
    """`evaluate` / a task teacher of another task printed transformers' table of every missing key before the error
    that says what is wrong; the table (and its "checkpoint seem corrupted" line) now goes when the error replaces
    it, and what transformers logs stays when the model loads whole."""
    import logging

    from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForImageTextRetrieval
    from trainers.tasks import load_whole_task_model

    class Collect(logging.Handler):  # transformers' loggers do not propagate to the root (nor to caplog)
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    collect = Collect()
    logging.getLogger("transformers").addHandler(collect)
    try:
        EfficientVLMForImageTextRetrieval(EfficientVLMConfig.from_preset("tiny")).save_pretrained(tmp_path / "r")
        message = r"^--flag \S+ is a checkpoint of EfficientVLMForImageTextRetrieval, without the vqa weights \(\d+ "
        with pytest.raises(ValueError, match=message + r"missing, e\.g\. answer_decoder\.[^)]+\), refused\.$"):
            load_whole_task_model("vqa", tmp_path / "r", "--flag", "refused.")
        assert collect.messages == []
        # Without the hold, the same load logs its report and the tied-weights line.
        from modeling_efficientvlm import EfficientVLMForQuestionAnswering

        EfficientVLMForQuestionAnswering.from_pretrained(tmp_path / "r")
        assert any("LOAD REPORT" in m for m in collect.messages) and any("corrupted" in m for m in collect.messages)
        collect.messages.clear()
        # A whole model: what transformers logged while loading it is logged as usual, once.
        from transformers.utils.logging import get_logger

        import trainers.tasks

        class Loaded:
            @staticmethod
            def from_pretrained(name_or_path, output_loading_info, **kwargs):
                get_logger("transformers.modeling_utils").warning("a note from the load")
                return "model", {"missing_keys": [], "unexpected_keys": ["unused.weight"]}

        monkeypatch.setattr(trainers.tasks, "task_model_class", lambda task: Loaded)
        assert load_whole_task_model("retrieval", tmp_path / "r", "--flag", "refused.") == "model"
        assert collect.messages == ["a note from the load"]
    finally:
        logging.getLogger("transformers").removeHandler(collect)


@pytest.mark.parametrize(
    "command, flag",
    [
        ("evaluate", "--model_name_or_path"),
        ("export", "--model_name_or_path"),
        ("finetune", "--model_name_or_path"),
        ("prune", "--model_name_or_path"),
        ("distill", "--teacher_model_name_or_path"),
        ("benchmark", "--models"),
        ("app", "--models"),
    ],
)
def test_a_model_flag_naming_a_folder_without_config_is_refused_by_name(tmp_path, command: str, flag: str) -> None:
    """A folder that exists but holds no model (an empty or mistaken output folder, a folder of images) was reported
    by the first file Transformers missed: "Unrecognized model ... Should have a `model_type` key", "no file named
    model.safetensors", or, for the training commands, a missing processor."""
    import importlib

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "cat.png").write_bytes(b"")
    argv = {
        "evaluate": ["--task", "vqa", "--eval_file", "x.json"],
        "export": ["--output_dir", str(tmp_path / "out")],
        "finetune": ["--task", "vqa", "--train_file", "x.json", "--output_dir", str(tmp_path / "out")],
        "prune": ["--task", "vqa", "--train_file", "x.json", "--output_dir", str(tmp_path / "out")],
        "distill": ["--train_file", "x.json", "--output_dir", str(tmp_path / "out")],
        "benchmark": [],
        "app": [],
    }[command]
    main = importlib.import_module(f"trainers.commands.{command}").main
    with pytest.raises(ValueError, match=rf"^{flag} '{re.escape(str(folder))}' holds no config.json, so it is not"):
        main([flag, str(folder), *argv])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["finetune", "prune", "distill", "export", "processor", "convert", "demo"])
def test_an_output_dir_that_is_a_file_is_refused_by_name(tmp_path, capsys, command: str) -> None:
    """An --output_dir naming an existing file said only "[Errno 17] File exists" (or "[Errno 20] Not a directory"
    for the demo), after the flags' checks and, for some commands, the model's load."""
    import importlib

    output = tmp_path / "results.txt"
    output.write_text("keep me")
    argv = ["--output_dir", str(output)]
    argv += {
        "finetune": ["--task", "vqa", "--preset", "tiny", "--train_file", "x.json"],
        "prune": ["--task", "vqa", "--preset", "tiny", "--train_file", "x.json"],
        "distill": ["--teacher_model_name_or_path", "org/t", "--train_file", "x.json"],
        "export": ["--model_name_or_path", "org/m"],
        "processor": ["--tokenizer", "vocab.txt"],
        "convert": ["--checkpoint", "model.pth", "--task", "vqa"],
        "demo": ["--quick"],
    }[command]
    message = f"--output_dir {str(output)!r} is a file; give a folder (created when missing)"
    main = importlib.import_module(f"trainers.commands.{command}").main
    if command == "demo":  # its own argparse parser: a usage error
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
    else:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            main(argv)
    assert output.read_text() == "keep me"


# Flags the training commands need beside the ones under test (never read: the flags under test are refused first).
TRAINING_COMMAND_FLAGS = {
    "pretrain": ["--preset", "tiny", "--vocab_file", "vocab.txt", "--train_file", "x.json"],
    "finetune": ["--task", "vqa", "--preset", "tiny", "--train_file", "x.json"],
    "prune": ["--task", "vqa", "--preset", "tiny", "--train_file", "x.json", "--target_sparsity", "0.5"],
    "distill": ["--teacher_model_name_or_path", "org/t", "--train_file", "x.json"],
}


@pytest.mark.parametrize("command", list(TRAINING_COMMAND_FLAGS))
@pytest.mark.parametrize(
    "flag", ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"]
)
def test_batch_sizes_and_accumulation_below_one_are_refused_by_name(tmp_path, command: str, flag: str) -> None:
    """0 reached torch's DataLoader ("batch_size should be a positive integer value") or, for the accumulation
    steps, a ZeroDivisionError traceback, after the model had loaded."""
    import importlib

    argv = ["--output_dir", str(tmp_path / "out"), f"--{flag}", "0"]
    argv += TRAINING_COMMAND_FLAGS[command]
    main = importlib.import_module(f"trainers.commands.{command}").main
    with pytest.raises(ValueError, match=rf"^--{flag} must be at least 1; got 0\.$"):
        main(argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", list(TRAINING_COMMAND_FLAGS))
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max_steps", "0"], r"^--max_steps 0 trains no step: give a positive number of optimizer steps"),
        (["--num_train_epochs", "0"], r"^--num_train_epochs 0 trains no step: give a positive number of epochs"),
        (["--num_train_epochs", "-1.5"], r"^--num_train_epochs -1\.5 trains no step"),
    ],
)
def test_a_run_that_would_train_no_step_is_refused_by_name(tmp_path, command: str, flags, message) -> None:
    """--num_train_epochs 0 saved the model untrained as the command's result; --max_steps 0 (read as unset by
    Transformers) trained one stray step."""
    import importlib

    argv = ["--output_dir", str(tmp_path / "out"), *flags]
    argv += TRAINING_COMMAND_FLAGS[command]
    main = importlib.import_module(f"trainers.commands.{command}").main
    with pytest.raises(ValueError, match=message):
        main(argv)
    assert not (tmp_path / "out").exists()
    # Either is fine with the other set: a fraction of an epoch, or steps over a zero epoch count.
    from transformers import TrainingArguments

    from trainers.commands.common import check_training_sizes

    for fine in ({"num_train_epochs": 0.5}, {"num_train_epochs": 0, "max_steps": 3}):
        check_training_sizes(TrainingArguments(output_dir=str(tmp_path / "out"), **fine))
