"""`efficientvlm processor` (a WordPiece vocabulary trained on your own X-VLM JSON files, or an existing BERT
tokenizer) and models built for the processor's tokenizer: a preset takes its vocab_size and special-token ids, a
saved model too small for the tokenizer is a named error before training."""

from __future__ import annotations

import json

import pytest

from trainers import commands as cli
from trainers.data.vocabulary import texts_from_files
from trainers.demo.corpus import generate_demo_data, write_demo_vocab

TRAINING = ["--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu", "--save_strategy", "no"]


def test_processor_trains_a_vocabulary_that_a_preset_model_takes(tmp_path) -> None:
    from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMProcessor

    data = generate_demo_data(tmp_path / "data", quick=True, num_train_images=20, num_eval_images=6)
    processor_dir = tmp_path / "my_processor"
    cli.main(
        ["processor", "--train_files", str(data.pretrain), str(data.vqa_train), str(data.nlvr2_train)]
        + ["--vocab_size", "300", "--min_frequency", "2", "--image_size", "64", "--max_text_length", "40"]
        + ["--output_dir", str(processor_dir)]
    )
    processor = EfficientVLMProcessor.from_pretrained(processor_dir)
    tokenizer = processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert 5 < len(tokenizer) <= 300 and tokenizer.model_max_length == 40 and processor.max_length == 40
    assert processor.image_processor.size.height == 64
    records = json.loads(data.pretrain.read_text())
    caption = records[0]["caption"] if isinstance(records[0]["caption"], str) else records[0]["caption"][0]
    question = json.loads(data.vqa_train.read_text())[0]["question"]
    for text in (caption, question, caption.upper()):
        ids = processor(text=text)["input_ids"][0].tolist()
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert tokenizer.unk_token_id not in ids, text

    output = tmp_path / "pretrained"
    cli.main(
        ["pretrain", "--preset", "tiny", "--processor_name_or_path", str(processor_dir)]
        + ["--config_overrides", json.dumps({"vision_config": {"image_size": 64}})]
        + ["--train_file", str(data.pretrain), "--image_root", str(data.image_root)]
        + ["--output_dir", str(output), "--max_steps", "2", *TRAINING]
    )
    config = EfficientVLMConfig.from_pretrained(output)
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.text_config.pad_token_id == tokenizer.pad_token_id
    assert config.text_config.bos_token_id == tokenizer.cls_token_id
    assert config.text_config.eos_token_id == tokenizer.sep_token_id
    assert len(EfficientVLMProcessor.from_pretrained(output).tokenizer) == len(tokenizer)


def test_vocab_size_is_a_ceiling_and_every_character_continues_a_word(caplog) -> None:
    """The trainer kept a character's ## continuation only where it was seen inside a word ("qa" was one [UNK]),
    and `--vocab_size` was exceeded without a word."""
    from trainers.data.vocabulary import train_wordpiece_tokenizer

    texts = ["a red box", "xyz q"] * 50
    for size in (26, 28, 30, 40):
        tokenizer = train_wordpiece_tokenizer(texts, vocab_size=size, min_frequency=1)
        assert len(tokenizer) <= size
        assert "[UNK]" not in tokenizer.tokenize("qa boxy zeb")  # a, q, z: never seen inside a word
    with caplog.at_level("WARNING"):
        tokenizer = train_wordpiece_tokenizer(texts, vocab_size=10, min_frequency=1)
    assert len(tokenizer) == 5 + 2 * 10  # the special tokens, the 10 characters alone and as continuations
    assert "--vocab_size 10: the texts' 10 characters, alone and as ## continuations, make 25 tokens" in caplog.text


def test_preset_vocab_size_follows_the_tokenizer_and_overrides_must_fit(tmp_path) -> None:
    from trainers.training import build_model_and_processor

    vocab = write_demo_vocab(tmp_path / "vocab.txt")
    model, processor = build_model_and_processor("pretraining", preset="tiny", vocab_file=vocab)
    size = len(processor.tokenizer)
    assert size > 128  # the tiny preset's own vocab_size
    assert model.config.text_config.vocab_size == size
    assert model.get_input_embeddings().num_embeddings == size
    bigger = {"text_config": {"vocab_size": size + 10}}
    model, _ = build_model_and_processor("pretraining", preset="tiny", config_overrides=bigger, vocab_file=vocab)
    assert model.config.text_config.vocab_size == size + 10
    with pytest.raises(ValueError, match=rf"the tokenizer has {size} tokens but the model's vocab_size is 100 "):
        cli.main(
            ["pretrain", "--preset", "tiny", "--vocab_file", str(vocab), "--train_file", "unused.json"]
            + ["--config_overrides", '{"text_config": {"vocab_size": 100}}', "--output_dir", str(tmp_path / "out")]
        )


def test_saved_model_smaller_than_the_tokenizer_is_a_named_error_at_start(tmp_path) -> None:
    from trainers.training import build_task_model

    saved = tmp_path / "small_model"
    build_task_model("pretraining", preset="tiny").save_pretrained(saved)  # vocab_size 128
    vocab = write_demo_vocab(tmp_path / "vocab.txt")
    processor_dir = tmp_path / "processor"
    cli.main(["processor", "--tokenizer", str(vocab), "--output_dir", str(processor_dir), "--image_size", "32"])
    size = len(vocab.read_text().split())
    message = rf"the tokenizer has {size} tokens but the model's vocab_size is 128 \(--model_name_or_path {saved}\)"
    for processor in (["--processor_name_or_path", str(processor_dir)], ["--vocab_file", str(vocab)]):
        with pytest.raises(ValueError, match=message):
            cli.main(
                ["finetune", "--task", "retrieval", "--model_name_or_path", str(saved), *processor]
                + ["--train_file", "unused.json", "--output_dir", str(tmp_path / "out"), "--max_steps", "1", *TRAINING]
            )
    assert not (tmp_path / "out").exists()


def test_texts_of_every_record_kind_and_named_errors(tmp_path) -> None:
    records = [
        {"image": "a.jpg", "caption": "A red Circle"},
        {"image": "b.jpg", "caption": ["one", "two"]},
        {"image": "c.jpg", "question": "what colour?", "answer": ["red", "red"]},
        {"images": ["l.jpg", "r.jpg"], "sentence": "both are blue", "label": True},
        # Every text a model reads: caption negatives and region captions (X-VLM's `elems` too).
        {
            "image": "d.jpg",
            "caption": "x",
            "negative_caption": "y",
            "regions": [{"caption": "a dog", "bbox": [0, 0, 1, 1]}],
        },
        {"image": "e.jpg", "caption": "z", "elems": [{"caption": ["a cat", "the cat"], "bb": [0, 0, 1, 1]}]},
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    answers = tmp_path / "answer_list.json"
    answers.write_text('["red", "blue"]')
    texts = texts_from_files([path, answers])
    assert texts == ["A red Circle", "one", "two", "what colour?", "red", "red", "both are blue"] + [
        "x",
        "y",
        "a dog",
        "z",
        "a cat",
        "the cat",
        "red",
        "blue",
    ]
    path.write_text(json.dumps([{"image": "a.jpg", "question": "how many?", "answer": [2]}]))
    with pytest.raises(ValueError, match=r"mixed.json, record 0: `answer` must be a string .* item 0 is int"):
        texts_from_files([path])
    path.write_text(json.dumps([{"image": "a.jpg", "label": True}]))
    with pytest.raises(ValueError, match="holds no text"):
        texts_from_files([path])
    with pytest.raises(ValueError, match="exactly one of --tokenizer and --train_files"):
        cli.main(["processor", "--output_dir", str(tmp_path / "p")])
    # A tokenizer that is not there, or a tokenizer.json read as a vocab.txt: named, not saved as a 5-token processor.
    with pytest.raises(FileNotFoundError, match=r"--tokenizer \./nodir: no such folder or file"):
        cli.main(["processor", "--tokenizer", "./nodir", "--output_dir", str(tmp_path / "p")])
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json: a JSON file is not a vocab.txt; give the folder holding it"):
        cli.main(["processor", "--tokenizer", str(tmp_path / "tokenizer.json"), "--output_dir", str(tmp_path / "p")])
    (tmp_path / "specials.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(ValueError, match=r"specials.txt: no vocabulary found there \(5 tokens"):
        cli.main(["processor", "--tokenizer", str(tmp_path / "specials.txt"), "--output_dir", str(tmp_path / "p")])
    assert not (tmp_path / "p").exists()
    # A model's folder: its tokenizer is not replaced under it.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match=r"holds a model \(model.safetensors\): a new processor there would replace"):
        cli.main(["processor", "--tokenizer", str(tmp_path / "specials.txt"), "--output_dir", str(tmp_path / "model")])
    assert [path.name for path in (tmp_path / "model").iterdir()] == ["model.safetensors"]


def test_config_overrides_on_a_saved_model_set_how_it_trains_and_nothing_else(tmp_path) -> None:
    import torch

    from trainers.training import build_model_and_processor, build_task_model

    from .conftest import make_inputs

    saved = tmp_path / "pretrained"
    vocab = write_demo_vocab(tmp_path / "vocab.txt")
    pretrained, processor = build_model_and_processor("pretraining", preset="tiny", vocab_file=vocab)
    pretrained.save_pretrained(saved)
    processor.save_pretrained(saved)
    overrides = {"itm_negatives_per_pair": 2, "itm_random_negatives": 0.25}
    model = build_task_model("retrieval", saved, config_overrides=overrides)
    assert (model.config.itm_negatives_per_pair, model.config.itm_random_negatives) == (2, 0.25)
    inputs = make_inputs(model.config, batch_size=4)
    with torch.no_grad():
        assert model.train()(**inputs, image_ids=torch.arange(4)).itm_logits.shape == (20, 2)  # 2 negatives per pair
    with pytest.raises(
        ValueError, match=r"\['embed_dim'\] would change the config a saved model \(--model_name_or_path"
    ):
        build_model_and_processor("retrieval", saved, config_overrides={"embed_dim": 64})
    with pytest.raises(ValueError, match="itm_negatives_per_pair"):
        build_task_model("retrieval", saved, config_overrides={"itm_negatives_per_pair": 0})
    # Through the CLI: the fine-tuned folder keeps the setting it trained with.
    data = generate_demo_data(tmp_path / "data", quick=True, num_train_images=12, num_eval_images=4)
    output = tmp_path / "retrieval"
    cli.main(
        ["finetune", "--task", "retrieval", "--model_name_or_path", str(saved)]
        + ["--config_overrides", '{"itm_negatives_per_pair": 2}', "--train_file", str(data.retrieval_train)]
        + ["--image_root", str(data.image_root), "--output_dir", str(output), "--max_steps", "1", *TRAINING]
    )
    assert json.loads((output / "config.json").read_text())["itm_negatives_per_pair"] == 2
