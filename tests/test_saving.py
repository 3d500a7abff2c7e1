"""`trainers.saving.save_model_folder`: special tokens from the saved tokenizer, the text limit, a complete folder."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertTokenizer

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMProcessor
from trainers.saving import model_folder_files, save_model_folder, special_token_ids
from trainers.tasks import task_model_class

from .data_utils import CLS_ID, PAD_ID, SEP_ID, make_image, make_processor


def _captioner_that_always_says_sep(config: EfficientVLMConfig):
    torch.manual_seed(0)
    model = task_model_class("captioning")(config).eval()
    with torch.no_grad():
        model.lm_head.decoder.bias.zero_()
        model.lm_head.decoder.bias[SEP_ID] = 100.0  # [SEP] wins every step
    return model


def test_generate_stops_at_the_saved_vocabularys_own_sep(tmp_path) -> None:
    # A vocabulary that is not BERT's: [CLS] = 2, [SEP] = 3 (the config's defaults are BERT's 101 / 102).
    config = EfficientVLMConfig.from_preset("tiny")
    assert (config.text_config.bos_token_id, config.text_config.eos_token_id) == (101, 102)
    processor = make_processor(tmp_path, image_size=config.vision_config.image_size)
    assert (processor.tokenizer.cls_token_id, processor.tokenizer.sep_token_id) == (CLS_ID, SEP_ID)
    pixel_values = processor(images=[make_image("red"), make_image("blue")])["pixel_values"]
    max_new_tokens = 8

    # Without the tokenizer's ids the model never stops: 102 is not its [SEP].
    unsynced = _captioner_that_always_says_sep(config)
    with torch.no_grad():
        endless = unsynced.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens)
    assert endless.shape[1] == 1 + max_new_tokens

    folder = save_model_folder(_captioner_that_always_says_sep(config), processor, tmp_path / "captioner")
    saved = json.loads((folder / "config.json").read_text())["text_config"]
    generation = json.loads((folder / "generation_config.json").read_text())
    for values in (saved, generation):
        assert values["bos_token_id"] == CLS_ID
        assert values["eos_token_id"] == SEP_ID == processor.tokenizer.sep_token_id
        assert values["pad_token_id"] == PAD_ID

    model = task_model_class("captioning").from_pretrained(folder).eval()
    reloaded = EfficientVLMProcessor.from_pretrained(folder)
    assert model.generation_config.eos_token_id == reloaded.tokenizer.sep_token_id == SEP_ID
    # The processor cuts texts at 40 tokens, past the model's default 32 (within its 64 positions): the saved limit is
    # the processor's, or transformers warns of "indexing errors" at every text of 33-40 tokens.
    assert reloaded.tokenizer.model_max_length == processor.max_length == 40 > model.config.max_text_length
    with torch.no_grad():
        caption = model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens)
    # It starts from its own [CLS] and stops at its own [SEP], long before max_new_tokens.
    assert caption.shape[1] < 1 + max_new_tokens
    assert caption[:, 0].tolist() == [CLS_ID, CLS_ID]
    assert caption[:, 1].tolist() == [SEP_ID, SEP_ID]
    assert reloaded.batch_decode(caption, skip_special_tokens=True) == ["", ""]


def test_special_token_ids_fall_back_from_bos_eos_to_cls_sep(tmp_path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[UNK]", "[SEP]", "[PAD]", "[MASK]", "[CLS]", "red"]) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab))
    assert special_token_ids(tokenizer) == {"bos_token_id": 4, "eos_token_id": 1, "pad_token_id": 2, "sep_token_id": 1}


def test_saved_folder_is_complete_and_the_callers_processor_is_untouched(tmp_path) -> None:
    config = EfficientVLMConfig.from_preset("tiny")
    processor = make_processor(tmp_path, image_size=config.vision_config.image_size)
    before = processor.tokenizer.model_max_length
    folder = save_model_folder(task_model_class("vqa")(config), processor, tmp_path / "vqa")
    assert processor.tokenizer.model_max_length == before
    saved = EfficientVLMProcessor.from_pretrained(folder).tokenizer
    assert saved.model_max_length == 40 and saved.init_kwargs["model_max_length"] == 40
    short = make_processor(tmp_path / "short", image_size=config.vision_config.image_size, max_length=16)
    for length, expected in ((16, config.max_text_length), (100, config.text_config.max_position_embeddings)):
        short.max_length = length
        folder = save_model_folder(task_model_class("vqa")(config), short, tmp_path / f"vqa_{length}")
        assert EfficientVLMProcessor.from_pretrained(folder).tokenizer.model_max_length == expected, length
    # Training leftovers in the same output folder are not part of the model.
    for junk in ("training_args.bin", "trainer_state.json", "all_results.json", "masker.pt", "train.log"):
        (folder / junk).write_text("x")
    (folder / "runs").mkdir()
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "model.safetensors").write_text("x")
    files = model_folder_files(folder)
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md"} <= set(files)
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert {"configuration_efficientvlm.py", "modeling_efficientvlm_vqa.py"} <= set(files)
    assert not {"training_args.bin", "trainer_state.json", "all_results.json", "masker.pt", "train.log"} & set(files)
    assert json.loads((folder / "config.json").read_text())["auto_map"]


def test_save_needs_the_processor(tmp_path) -> None:
    with pytest.raises(ValueError, match="processor"):
        save_model_folder(task_model_class("vqa")(EfficientVLMConfig.from_preset("tiny")), None, tmp_path / "x")


def test_a_model_saved_over_another_leaves_none_of_the_others_files(tmp_path, caplog) -> None:
    """Saving into a folder that holds another model (another task, a pruned one) replaced the shared files but
    kept the rest: the other task's module and a pruning report whose sparsity the new card then claimed."""
    config = EfficientVLMConfig.from_preset("tiny")
    processor = make_processor(tmp_path, image_size=config.vision_config.image_size)
    folder = tmp_path / "model"
    report = {"sparsity": 0.5, "parameters_before": 123457, "parameters_after": 23457}
    save_model_folder(task_model_class("vqa")(config), processor, folder, pruning_report=report)
    assert "pruning removed 100,000 parameters" in (folder / "README.md").read_text()
    assert {"pruning_report.json", "modeling_efficientvlm_vqa.py"} <= set(model_folder_files(folder))
    (folder / "eval_results.json").write_text('{"vqa_accuracy": 0.9}')  # the earlier model's
    own = {"my_script.py": "print(1)", "trainer_state.json": "{}"}  # not the save's
    for name, text in own.items():
        (folder / name).write_text(text)
    with caplog.at_level("WARNING"):
        save_model_folder(task_model_class("retrieval")(config), processor, folder)
    files = set(model_folder_files(folder))
    assert "pruning_report.json" not in files and "modeling_efficientvlm_vqa.py" not in files
    assert "modeling_efficientvlm_retrieval.py" in files
    assert ": eval_results.json, generation_config.json, modeling_efficientvlm_decoder.py, " in caplog.text  # named
    assert not (folder / "eval_results.json").exists()
    assert all((folder / name).read_text() == text for name, text in own.items())
    assert [path.name for path in folder.iterdir() if path.name.startswith(".saving")] == []
    card = (folder / "README.md").read_text()
    assert "pruning removed" not in card and "model_name: model\n" in card  # the folder's name, not the staging one
    reloaded = task_model_class("retrieval").from_pretrained(folder)
    assert type(reloaded).__name__ == "EfficientVLMForImageTextRetrieval"


@pytest.mark.parametrize("task", ["pretraining", "vqa", "captioning", "nlvr2"])
def test_a_checkpoint_resumes_without_a_missing_keys_warning_for_its_tied_weights(tmp_path, task: str) -> None:
    """Every resume warned "There were missing keys in the checkpoint model loaded" for the tied copies a save leaves
    out (an LM head's decoder, NLVR2's shared keys and values); a key really missing still warns."""
    import logging

    from safetensors.torch import load_file, save_file
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = task_model_class(task)(EfficientVLMConfig.from_preset("tiny"))
    tied = set(model.all_tied_weights_keys)
    assert tied and model._keys_to_ignore_on_save == tied
    model.save_pretrained(tmp_path / "checkpoint")
    saved = load_file(tmp_path / "checkpoint" / "model.safetensors")
    assert set(saved) == set(model.state_dict()) - tied  # the files a save writes are unchanged
    trainer = Trainer(model=model, args=TrainingArguments(tmp_path / "run", report_to=[], use_cpu=True))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.trainer")
    logger.addHandler(handler)
    try:
        trainer._load_from_checkpoint(str(tmp_path / "checkpoint"))
        assert not [record for record in records if "missing keys" in record.getMessage()]
        for target, source in model.all_tied_weights_keys.items():  # still one tensor each
            assert model.get_parameter(target) is model.get_parameter(source)
        dropped = next(key for key in saved if key.endswith("layernorm.weight") or key.endswith("norm.weight"))
        save_file(
            {key: value for key, value in saved.items() if key != dropped},
            tmp_path / "checkpoint" / "model.safetensors",
        )
        trainer._load_from_checkpoint(str(tmp_path / "checkpoint"))
        assert [record for record in records if dropped in record.getMessage()]
    finally:
        logger.removeHandler(handler)


def test_saved_weights_get_the_mode_of_any_other_file_of_the_folder(tmp_path) -> None:
    """safetensors >= 0.8 writes weights 0600 whatever the umask: a folder saved for a serving container or a shared
    directory held weights no other user could read, beside a readable config.json."""
    import os

    model = task_model_class("retrieval")(EfficientVLMConfig.from_preset("tiny"))
    previous = os.umask(0o027)
    try:
        model.save_pretrained(tmp_path / "shared")
    finally:
        os.umask(previous)
    mode = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "shared").iterdir()}
    assert mode["model.safetensors"] == mode["config.json"] == 0o640
    # A save over an earlier one keeps the mode its owner gave the weights.
    os.chmod(tmp_path / "shared" / "model.safetensors", 0o600)
    model.save_pretrained(tmp_path / "shared")
    assert (tmp_path / "shared" / "model.safetensors").stat().st_mode & 0o777 == 0o600


def test_a_model_folder_saved_again_keeps_the_modes_of_the_files_it_replaces(tmp_path) -> None:
    """The commands save through a staging folder moved into place: a file made group-writable in a shared folder
    (or private) came back with the umask's mode after the next save over it."""
    import os

    config = EfficientVLMConfig.from_preset("tiny")
    processor = make_processor(tmp_path, image_size=config.vision_config.image_size)
    folder = tmp_path / "model"
    previous = os.umask(0o022)
    try:
        save_model_folder(task_model_class("retrieval")(config), processor, folder)
        os.chmod(folder / "config.json", 0o664)
        os.chmod(folder / "model.safetensors", 0o600)
        (folder / "README.md").unlink()  # written anew by the next save
        save_model_folder(task_model_class("retrieval")(config), processor, folder)
    finally:
        os.umask(previous)
    mode = {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir()}
    assert mode["config.json"] == 0o664 and mode["model.safetensors"] == 0o600
    assert mode["README.md"] == mode["processor_config.json"] == 0o644
