"""The `efficientvlm` command: help texts and the pretrain -> finetune -> evaluate -> benchmark path on real files."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from trainers import commands as cli
from trainers.demo.corpus import generate_demo_data, write_demo_vocab


def test_top_level_help_lists_every_stage(capsys) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("pretrain", "finetune", "distill", "prune", "evaluate", "benchmark", "demo"):
        assert command in out
    assert cli.main(["compress"]) == 2
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("pretrain", "--preset"),
        ("finetune", "--task"),
        ("distill", "--teacher_model_name_or_path"),
        ("prune", "--target_sparsity"),
        ("evaluate", "--eval_file"),
        ("benchmark", "--models"),
        ("demo", "--quick"),
    ],
)
def test_each_subcommand_has_useful_help(command: str, expected: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert expected in capsys.readouterr().out


def test_console_script_is_installed() -> None:
    script = shutil.which("efficientvlm")
    assert script is not None, "the `efficientvlm` console script is not on PATH: install the package (README)"
    completed = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0 and "usage: efficientvlm" in completed.stdout


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
        ]
    )
    assert json.loads((tmp_path / "again.json").read_text()) == results

    capsys.readouterr()
    cli.main(["benchmark", "--models", str(tmp_path / "pretrained"), str(tmp_path / "nlvr2"), "--repeats", "2"])
    table = capsys.readouterr().out
    assert "| model |" in table and "1.00x" in table
