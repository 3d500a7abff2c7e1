"""`--recipe`: named settings shipped with the package fill a command's options; flags on the command line win."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from transformers import TrainingArguments

from trainers.commands.common import DataArguments, ModelArguments, parse_arguments, parse_json_option, recipe_fields
from trainers.recipes import RECIPE_DIR, load_recipe, recipe_names


def _dataclasses(command: str) -> tuple:
    from trainers.commands.distill import DistillArguments
    from trainers.commands.finetune import TaskArguments
    from trainers.commands.prune import PruneArguments

    return {
        "pretrain": (ModelArguments, DataArguments, TrainingArguments),
        "finetune": (TaskArguments, ModelArguments, DataArguments, TrainingArguments),
        "distill": (DistillArguments, TrainingArguments),
        "prune": (PruneArguments, ModelArguments, DataArguments, TrainingArguments),
    }[command]


# The flags each command needs besides what a recipe gives.
REQUIRED = {
    "pretrain": ["--preset", "xvlm-base", "--output_dir", "unused"],
    "finetune": ["--model_name_or_path", "hub-user/unused", "--output_dir", "unused"],
    "distill": ["--teacher_model_name_or_path", "hub-user/unused", "--output_dir", "unused"],
    "prune": ["--model_name_or_path", "hub-user/unused", "--output_dir", "unused"],
}


def _parse(command: str, *argv: str) -> tuple:
    return parse_arguments(command, _dataclasses(command), [*REQUIRED[command], *argv], "test")


def _value(arguments: tuple, name: str):
    for parsed in arguments:
        if hasattr(parsed, name):
            value = getattr(parsed, name)
            return getattr(value, "value", value)  # enums (lr_scheduler_type) as their strings
    raise AssertionError(f"no parsed dataclass has {name}")


def test_a_recipe_fills_the_options_and_explicit_flags_win() -> None:
    prune_args, _, _, training_args = _parse("prune", "--recipe", "paper-vqa")
    assert prune_args.task == "vqa"  # a required flag the recipe gives
    assert (prune_args.target_sparsity, prune_args.mask_learning_rate, prune_args.mask_freeze_fraction) == (
        0.35,
        0.01,
        0.5,
    )
    assert json.loads(prune_args.kd_term_weights)["vision_hidden"] == 0.2
    assert (training_args.learning_rate, training_args.num_train_epochs) == (5e-5, 20)
    assert training_args.per_device_train_batch_size == 16
    assert {"task", "target_sparsity"} <= recipe_fields(prune_args)

    prune_args, _, _, training_args = _parse(
        "prune", "--recipe", "paper-vqa", "--learning_rate", "1e-3", "--target_sparsity", "0.5", "--task", "nlvr2"
    )
    assert (training_args.learning_rate, prune_args.target_sparsity, prune_args.task) == (1e-3, 0.5, "nlvr2")
    assert not {"target_sparsity", "task"} & recipe_fields(prune_args)
    assert "learning_rate" not in recipe_fields(training_args)
    assert training_args.num_train_epochs == 20  # the rest still from the recipe

    # A flag equal to the option's default still overrides the recipe: explicit flags are detected as given,
    # not by comparing values with the defaults (0.01 is the default mask learning rate; small-cpu says 0.1).
    prune_args, *_ = _parse("prune", "--recipe", "small-cpu", "--task", "vqa", "--mask_learning_rate", "0.01")
    assert prune_args.mask_learning_rate == 0.01
    prune_args, *_ = _parse("prune", "--recipe=small-cpu", "--task", "vqa", "--binary_masks", "false")
    assert prune_args.mask_learning_rate == 0.1 and prune_args.binary_masks is False

    # Without --recipe nothing changes.
    prune_args, _, _, training_args = _parse("prune", "--task", "vqa", "--target_sparsity", "0.3")
    assert prune_args.mask_learning_rate == 0.01 and training_args.learning_rate == 5e-5
    assert recipe_fields(prune_args) == frozenset()


def test_unknown_recipes_keys_and_commands_are_named_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"Unknown recipe 'paper-vqa2'.*paper-vqa"):
        _parse("finetune", "--recipe", "paper-vqa2")
    bad_key = tmp_path / "mine.json"
    bad_key.write_text(json.dumps({"commands": {"prune": {"target_sparsity": 0.3, "target_sparsty": 0.4}}}))
    with pytest.raises(ValueError, match=r"mine\.json.*unknown key 'target_sparsty'"):
        _parse("prune", "--recipe", str(bad_key), "--task", "vqa")
    bad_top = tmp_path / "top.json"
    bad_top.write_text(json.dumps({"command": {"prune": {}}}))
    with pytest.raises(ValueError, match=r"top\.json: unknown key 'command'"):
        load_recipe(bad_top)
    bad_command = tmp_path / "cmd.json"
    bad_command.write_text(json.dumps({"commands": {"evaluate": {}}}))
    with pytest.raises(ValueError, match=r"cmd\.json: unknown command 'evaluate'"):
        load_recipe(bad_command)
    # A shared option that one of the recipe's commands lacks is named with that command.
    shared = tmp_path / "shared.json"
    shared.write_text(json.dumps({"shared": {"target_sparsity": 0.3}, "commands": {"finetune": {}}}))
    with pytest.raises(ValueError, match=r"shared\.json.*'target_sparsity'.*efficientvlm finetune"):
        _parse("finetune", "--recipe", str(shared), "--task", "vqa")
    with pytest.raises(ValueError, match=r"paper-vqa.*finetune/prune.*not `efficientvlm distill`"):
        _parse("distill", "--recipe", "paper-vqa")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_recipe(tmp_path / "missing.json")


def test_recipe_values_and_arguments_files_are_read_as_the_command_line_reads_flags(tmp_path, capsys) -> None:
    # A recipe's value is converted and checked as the flag would be, before any model loads.
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps({"commands": {"prune": {"max_steps": 3.7}}}))
    with pytest.raises(SystemExit):
        _parse("prune", "--recipe", str(typed), "--task", "vqa", "--target_sparsity", "0.3")
    assert "argument --max_steps/--max-steps: invalid int value: '3.7'" in capsys.readouterr().err
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps({"commands": {"prune": {"sparsity_ladder": [0.2, 0.4], "snap_to_target": True}}}))
    prune_args, *_ = _parse("prune", "--recipe", str(listed), "--task", "vqa")
    assert prune_args.sparsity_ladder == "0.2,0.4" and prune_args.snap_to_target is True

    # An arguments file: JSON objects for the JSON options, lists for comma-separated ones; errors name the file.
    options = {
        "task": "vqa", "model_name_or_path": "hub-user/unused", "output_dir": "unused", "sparsity_ladder": [0.2, 0.4],
        "config_overrides": {"label_smoothing": 0.1}, "kd_term_weights": {"vision_hidden": 0.1}, "max_steps": 5,
    }  # fmt: skip
    arguments = tmp_path / "args.json"
    arguments.write_text(json.dumps(options))
    prune_args, model_args, _, training_args = parse_arguments("prune", _dataclasses("prune"), [str(arguments)], "t")
    assert prune_args.sparsity_ladder == "0.2,0.4" and training_args.max_steps == 5
    assert parse_json_option(model_args.config_overrides, "config_overrides") == {"label_smoothing": 0.1}
    assert parse_json_option(prune_args.kd_term_weights, "kd_term_weights") == {"vision_hidden": 0.1}
    bad = {
        "not_json.json": ("{", r"not_json\.json is not valid JSON"),
        "list.json": ("[1]", r"list\.json must hold a JSON object of options; got a list"),
        "typo.json": (json.dumps({**options, "max_step": 5}), r"typo\.json: unknown key 'max_step'"),
    }
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            parse_arguments("prune", _dataclasses("prune"), [str(tmp_path / name)], "t")
    with pytest.raises(FileNotFoundError, match=r"nope\.json: no such file \(an arguments file"):
        parse_arguments("prune", _dataclasses("prune"), [str(tmp_path / "nope.json")], "t")
    (tmp_path / "untyped.json").write_text(json.dumps({**options, "max_steps": 3.7}))
    with pytest.raises(SystemExit):
        parse_arguments("prune", _dataclasses("prune"), [str(tmp_path / "untyped.json")], "t")
    assert "argument --max_steps/--max-steps: invalid int value: '3.7'" in capsys.readouterr().err


def test_every_json_file_a_command_reads_says_what_is_wrong_with_it(tmp_path) -> None:
    """Arguments files, recipes and answer lists had only "no such file" for a folder, json's "Expecting value: line 1
    column 1 (char 0)" for an empty file and a bare UnicodeDecodeError for a Latin-1 one; the records' reader said
    each by name. One reader serves them all now."""
    from trainers.training import read_answer_list

    (tmp_path / "empty.json").write_text(" \n")
    (tmp_path / "latin1.json").write_bytes('{"task": "vqa", "output_dir": "caf\u00e9"}'.encode("latin-1"))
    (tmp_path / "lines.json").write_text('"yes"\n"no"\n')
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(IsADirectoryError, match=r"^--answer_list \S+folder\.json is a folder: give the file \(a JSON"):
        read_answer_list(tmp_path / "folder.json")
    with pytest.raises(ValueError, match=r"^--answer_list \S+empty\.json is empty: expected a JSON list of candidate"):
        read_answer_list(tmp_path / "empty.json")
    with pytest.raises(
        ValueError, match=r"lines\.json is not valid JSON: Extra data at line 2, column 1 \(a JSON Lines"
    ):
        read_answer_list(tmp_path / "lines.json")
    with pytest.raises(ValueError, match=r"^Recipe file \S+empty\.json is empty: expected a recipe"):
        load_recipe(tmp_path / "empty.json")
    with pytest.raises(ValueError, match=r"^\S+latin1\.json is not UTF-8 text"):
        parse_arguments("prune", _dataclasses("prune"), [str(tmp_path / "latin1.json")], "t")


def test_recipe_list_and_the_recipes_command_name_every_recipe(capsys) -> None:
    from trainers import commands as cli

    names = recipe_names()
    assert {"paper-vqa", "paper-retrieval", "paper-nlvr2", "paper-captioning", "paper-distill", "small-cpu"} <= set(
        names
    )
    with pytest.raises(SystemExit) as exit_info:
        _parse("finetune", "--recipe", "list")
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out
    for argv in (["recipes"], ["recipes", "--num_threads", "1"]):
        assert cli.main(argv) == 0 and capsys.readouterr().out == listed
    for name in names:
        assert f"  {name} " in listed


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipe_parses_for_its_commands_and_builds_valid_settings(name: str) -> None:
    from modeling_efficientvlm import EfficientVLMConfig
    from trainers.commands.distill import _parse_layers
    from trainers.commands.prune import distillation_config_from, pruning_config_from
    from trainers.distillation import DistillationConfig

    recipe = load_recipe(name)
    assert recipe.path.parent == RECIPE_DIR and recipe.description and "\n" not in recipe.description
    data = json.loads(recipe.path.read_text())
    assert data.get("source"), f"{name} names no source for its numbers"
    for command in recipe.commands:
        needs_task = command in ("finetune", "prune") and "task" not in recipe.arguments(command)
        arguments = _parse(command, "--recipe", name, *(["--task", "vqa"] if needs_task else []))
        for key, value in recipe.arguments(command).items():
            parsed = _value(arguments, key)
            assert (json.loads(parsed) if isinstance(value, dict) else parsed) == value, (command, key)
        first = arguments[0]
        if command == "prune":
            pruning_config_from(first)
            first.teacher_model_name_or_path = "teacher"
            distillation_config_from(first)
        elif command in ("finetune", "distill"):
            DistillationConfig.from_dict(first.distillation_config_values())
            if command == "distill":
                _parse_layers(first)
        else:
            EfficientVLMConfig.from_preset("xvlm-base", **json.loads(first.config_overrides or "{}"))


def test_the_demo_runs_with_the_small_cpu_recipe() -> None:
    from modeling_efficientvlm import EfficientVLMConfig
    from trainers.demo.run import DemoSettings, _training_args, teacher_config
    from trainers.distillation import DistillationConfig

    recipe = load_recipe("small-cpu")
    settings = DemoSettings()
    # The demo's numbers, read from the recipe.
    assert (settings.initializer_range, settings.patch_size, settings.image_size) == (0.1, 16, 64)
    assert teacher_config(settings, 97).text_config.fusion_zero_init_residual
    assert teacher_config(settings, 97).vision_config.position_embedding_init == "sincos_2d"
    assert teacher_config(settings, 97).vision_config.zero_init_residual
    assert teacher_config(settings, 97).vision_config.output_position_embeddings
    text_config = teacher_config(settings, 97).text_config
    assert (text_config.hidden_dropout_prob, text_config.attention_probs_dropout_prob) == (0.0, 0.0)
    assert (settings.hidden_size, settings.num_heads, settings.intermediate_size) == (128, 4, 512)
    assert (settings.teacher_layers, settings.student_layers) == ((4, 2, 2), (2, 1, 1))
    assert (settings.batch_size, settings.learning_rate) == (32, 5e-4)
    assert (settings.mask_learning_rate, settings.prune_warmup_fraction, settings.target_sparsity) == (0.1, 0.3, 0.5)

    # ... are the recipe's: the demo's Trainer arguments ...
    args = _training_args("unused", settings, steps=10, seed=0)
    training = recipe.shared
    for key in ("per_device_train_batch_size", "learning_rate", "weight_decay", "warmup_steps", "use_cpu"):
        assert getattr(args, key) == training[key], key
    assert args.lr_scheduler_type.value == training["lr_scheduler_type"]
    # ... its pruning settings and task-stage KD (attention maps off) ...
    prune = recipe.arguments("prune")
    assert (prune["target_sparsity"], prune["mask_learning_rate"]) == (0.5, 0.1)
    assert prune["sparsity_warmup_fraction"] == 0.3
    kd = DistillationConfig(**recipe.arguments("finetune")["kd_term_weights"])
    assert (kd.text_attn, kd.vision_attn, kd.fusion_attn) == (0.0, 0.0, 0.0) and kd.text_hidden > 0
    assert recipe.arguments("prune")["kd_term_weights"] == recipe.arguments("finetune")["kd_term_weights"]
    # ... and its teacher is what `pretrain --recipe small-cpu --preset xvlm-base` builds.
    overrides = json.loads(_value(_parse("pretrain", "--recipe", "small-cpu"), "config_overrides"))
    overrides["text_config"]["vocab_size"] = 97
    assert teacher_config(settings, 97).to_dict() == EfficientVLMConfig.from_preset("xvlm-base", **overrides).to_dict()


def test_prune_ignores_a_recipes_kd_weights_without_a_teacher_but_not_a_flags() -> None:
    from trainers.commands.prune import distillation_config_from

    prune_args, *_ = _parse("prune", "--recipe", "paper-vqa")
    assert distillation_config_from(prune_args) is None
    prune_args, *_ = _parse("prune", "--task", "vqa", "--target_sparsity", "0.3", "--kd_term_weights", "{}")
    with pytest.raises(ValueError, match="--kd_term_weights needs a --teacher_model_name_or_path"):
        distillation_config_from(prune_args)


def test_sparsity_warmup_fraction_warms_the_target_up_over_that_share_of_the_steps() -> None:
    from trainers.pruning import PruningConfig
    from trainers.pruning.trainer import _MaskOptimizationCallback

    config = PruningConfig(target_sparsity=0.5, sparsity_warmup_fraction=0.3)
    trainer = SimpleNamespace(
        pruning_config=config,
        lagrangian=SimpleNamespace(warmup_steps=0),
        mask_freeze_step=None,
        snap=None,
        restored_schedule=None,
    )
    args = SimpleNamespace(gradient_accumulation_steps=1)
    _MaskOptimizationCallback(trainer).on_train_begin(args, SimpleNamespace(max_steps=250), None, train_dataloader=[])
    assert trainer.lagrangian.warmup_steps == 75  # int(0.3 * 250), as the demo computes it
    with pytest.raises(ValueError, match="not both"):
        PruningConfig(target_sparsity=0.5, sparsity_warmup_steps=10, sparsity_warmup_fraction=0.3)
    with pytest.raises(ValueError, match=r"sparsity_warmup_fraction.*\[0, 1\]"):
        PruningConfig(target_sparsity=0.5, sparsity_warmup_fraction=1.5)


def test_prune_runs_from_the_command_line_with_a_recipe_and_an_override(tmp_path) -> None:
    from trainers.commands import prune

    from .data_utils import write_image_text_json, write_vocab

    data, image_root = write_image_text_json(tmp_path, n=4)
    report = prune.main(
        ["--recipe", "small-cpu", "--task", "retrieval", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
        + ["--train_file", str(data), "--image_root", str(image_root), "--output_dir", str(tmp_path / "out")]
        + ["--max_steps", "2", "--per_device_train_batch_size", "8", "--target_sparsity", "0.3"]
        + ["--report_to", "none", "--save_strategy", "no"]
    )  # no teacher: the recipe's KD weights go unused
    assert report["target_sparsity"] == 0.3  # the flag, not the recipe's 0.5
    assert json.loads((tmp_path / "out" / "pruning_report.json").read_text())["target_sparsity"] == 0.3


def test_config_overrides_shape_a_preset_and_of_a_recipes_only_how_it_trains_applies_to_a_saved_model() -> None:
    """A recipe's preset shape is dropped on a saved model; its training fields (paper-captioning's label smoothing,
    small-cpu's ITM negatives) were dropped with it."""
    from trainers.commands.common import model_options

    model_args, *_ = _parse("pretrain", "--recipe", "small-cpu")  # with --preset xvlm-base
    assert model_options(model_args)["config_overrides"]["vision_config"]["patch_size"] == 16
    model_args, *_ = parse_arguments(
        "pretrain",
        _dataclasses("pretrain"),
        ["--recipe", "small-cpu", "--model_name_or_path", "hub-user/saved", "--output_dir", "unused"],
        "test",
    )
    assert model_options(model_args)["config_overrides"] == {
        "itm_random_negatives": 0.5,
        "itm_exclude_identical_texts": True,
    }
    _, model_args, *_ = _parse("finetune", "--recipe", "paper-captioning")  # with --model_name_or_path
    assert model_options(model_args)["config_overrides"] == {"label_smoothing": 0.1}
    _, model_args, *_ = _parse(
        "finetune", "--recipe", "paper-captioning", "--config_overrides", '{"label_smoothing": 0.2}'
    )
    assert model_options(model_args)["config_overrides"] == {"label_smoothing": 0.2}  # the flag wins
    model_args, *_ = parse_arguments(
        "pretrain",
        _dataclasses("pretrain"),
        ["--model_name_or_path", "hub-user/saved", "--config_overrides", '{"embed_dim": 64}', "--output_dir", "unused"],
        "test",
    )
    # The user's own overrides reach a saved model; building it checks that they only set how it trains.
    assert model_options(model_args)["config_overrides"] == {"embed_dim": 64}
