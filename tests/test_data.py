"""Datasets (X-VLM JSON and `datasets.Dataset`) and the task collators: contents, shapes, masking, errors."""

from __future__ import annotations

import codecs
import json
import re
import warnings

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader

from trainers.data import (
    CaptioningCollator,
    ImageTextCollator,
    ImageTextDataset,
    NLVR2Collator,
    NLVR2Dataset,
    PretrainingCollator,
    PretrainingDataset,
    VQACollator,
    VQADataset,
)
from trainers.tasks import build_dataset

from .data_utils import (
    CLS_ID,
    COLOURS,
    MASK_ID,
    PAD_ID,
    SEP_ID,
    make_image,
    make_processor,
    save_image,
    write_image_text_json,
    write_nlvr2_json,
    write_vqa_json,
)


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory):
    return make_processor(tmp_path_factory.mktemp("processor"), image_size=16, max_length=16)


@pytest.fixture(scope="module")
def image_text(tmp_path_factory: pytest.TempPathFactory) -> ImageTextDataset:
    path, root = write_image_text_json(tmp_path_factory.mktemp("image_text"), n=3, captions_per_image=2)
    return ImageTextDataset(path, root)


# ----------------------------------------------------------------------------------------------------- datasets


def test_image_text_dataset_expands_captions(image_text: ImageTextDataset) -> None:
    assert len(image_text) == 6 and image_text.num_images == 3
    assert image_text.text_to_image == [0, 0, 1, 1, 2, 2]
    assert image_text.image_to_texts == [[0, 1], [2, 3], [4, 5]]
    item = image_text[3]
    assert item["text"] == "a picture of a green circle" and item["image_id"] == 1
    assert item["image"].mode == "RGB" and item["image"].size == (41, 31)
    assert item["image"].getpixel((0, 0)) == (0, 128, 0)  # PIL's "green"
    assert image_text.get_image(2).getpixel((3, 3)) == (0, 0, 255)
    assert [x["image_id"] for x in image_text.image_view()] == [0, 1, 2]
    assert image_text.text_view()[5] == {"text": "a picture of a blue circle", "image_id": 2}


def test_image_ids_follow_paths_and_explicit_ids(tmp_path) -> None:
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        save_image(tmp_path / name, colour)
    records = [
        {"image": "a.png", "caption": "a red square"},
        {"image": "b.png", "caption": ["a blue square", "a blue box"]},
        {"image": "a.png", "caption": "a red box"},  # same path: same image id
        {"image": "b.png", "caption": "a blue ball", "image_id": "other"},  # explicit id wins
    ]
    with pytest.warns(UserWarning, match=r"appear under several `image_id`s \(first: .*b\.png, ids 'other', None;"):
        dataset = ImageTextDataset(records, image_root=tmp_path)
    assert dataset.text_to_image == [0, 1, 1, 0, 2]
    assert dataset.image_to_texts == [[0, 3], [1, 2], [4]]


def test_one_file_is_one_image_however_its_path_is_written_and_an_id_names_one_file(tmp_path) -> None:
    """Relative and absolute paths of one file were two images (each the other's retrieval / ITM negative); an
    `image_id` given to records of different files kept the first file only, scoring the others' captions on it."""
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        save_image(tmp_path / "photos" / name, colour)
    root = tmp_path / "photos"
    records = [
        {"image": "a.png", "caption": "a red square"},
        {"image": str(root / "a.png"), "caption": "a red box"},
        {"image": "../photos/b.png", "caption": "a blue square"},
        {"image": "b.png", "caption": "a blue box"},
    ]
    dataset = ImageTextDataset(records, image_root=root)
    assert dataset.num_images == 2 and dataset.image_to_texts == [[0, 1], [2, 3]]
    same_id = [{"image": "a.png", "caption": "a red square", "image_id": 5}, {"image": "b.png", "caption": "blue"}]
    same_id[1]["image_id"] = 5
    with pytest.raises(ValueError, match=r"^Record 1: `image_id` 5 is also the id of record 0, whose image is another"):
        ImageTextDataset(same_id, image_root=root)
    # One file under two ids is two images: allowed, said.
    with pytest.warns(UserWarning, match=r"1 image file\(s\) appear under several `image_id`s .*a\.png, ids '5', 5"):
        ImageTextDataset([{**same_id[0], "image_id": 5}, {**same_id[0], "image_id": "5"}], image_root=root)


def test_exif_orientation_is_applied_as_the_pipelines_apply_it(tmp_path) -> None:
    """A phone photo (pixels stored sideways, an EXIF tag saying so) trained sideways while `datasets` and the
    pipelines (transformers' `load_image`) read it upright."""
    from transformers.image_utils import load_image

    image = PIL.Image.new("RGB", (60, 90), "red")
    image.paste((0, 0, 255), (0, 0, 60, 10))  # a blue band at the top of the stored pixels
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    read = ImageTextDataset([{"image": "photo.jpg", "caption": "a photo"}], image_root=tmp_path)[0]["image"]
    upright = load_image(str(tmp_path / "photo.jpg"))
    assert read.size == upright.size == (90, 60)
    assert np.abs(np.asarray(read, dtype=int) - np.asarray(upright, dtype=int)).max() == 0
    assert read.getpixel((85, 30))[2] > 200 and read.getpixel((5, 30))[0] > 200  # the band is on the right now


def test_vqa_question_ids_repeated_are_named() -> None:
    records = [{"image": "x.png", "question": "q", "answer": "a", "question_id": i} for i in (1, 2, 1)]
    with pytest.warns(UserWarning, match=r"1 record\(s\) repeat the `question_id` of an earlier record \(records 2\)"):
        VQADataset(records, check_files=False)


def test_missing_and_unreadable_images_name_the_record(tmp_path) -> None:
    save_image(tmp_path / "ok.png", "red")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    records = [{"image": "ok.png", "caption": "a"}, {"image": "gone.png", "caption": "b"}]
    with pytest.raises(FileNotFoundError, match=r"Record 1: image file .*gone\.png not found"):
        ImageTextDataset(records, image_root=tmp_path)
    lazy = ImageTextDataset(records, image_root=tmp_path, check_files=False)
    with pytest.raises(FileNotFoundError, match=r"Record 1: .*gone\.png"):
        lazy[1]
    broken = ImageTextDataset([{"image": "broken.png", "caption": "c"}], image_root=tmp_path)
    with pytest.raises(ValueError, match=r"Record 0: cannot read image .*broken\.png"):
        broken[0]
    with pytest.raises(ValueError, match="Record 0 has no `image` field"):
        ImageTextDataset([{"caption": "a"}])
    with pytest.raises(ValueError, match=r"Record 0 has none of the fields \['caption', 'text'\]"):
        ImageTextDataset([{"image": "ok.png"}], image_root=tmp_path)
    # A field given as JSON null is named as null, not as missing.
    with pytest.raises(ValueError, match=r"^Record 0: `caption` is null; give a value\.$"):
        ImageTextDataset([{"image": "ok.png", "caption": None}], image_root=tmp_path)
    with pytest.raises(ValueError, match=r"^Record 1: `question` is null; give a value\.$"):
        VQADataset([{"image": "ok.png", "question": "what ?"}, {"image": "ok.png", "question": None}], tmp_path)


def test_too_long_captions_are_reported(tmp_path, processor) -> None:
    save_image(tmp_path / "a.png")
    long_caption = " ".join(["red"] * 20)
    records = [{"image": "a.png", "caption": [long_caption, "a red square", long_caption]}]
    with pytest.warns(UserWarning, match=r"2 of 3 captions are longer than max_length=16 tokens .*longest: 22"):
        dataset = ImageTextDataset(records, image_root=tmp_path, processor=processor)
    assert dataset.num_truncated == 2
    with pytest.warns(UserWarning, match="1 of 3 texts were longer than max_length=16"):
        batch = ImageTextCollator(processor)([dataset[0], dataset[1], dataset[1]])
    assert batch["input_ids"].shape == (3, 16)


def test_hf_dataset_with_image_feature(processor) -> None:
    hf = datasets.Dataset.from_dict(
        {"image": [make_image("red"), make_image("blue")], "caption": [["a red square", "a red box"], ["a blue ball"]]}
    )
    dataset = ImageTextDataset(hf)
    assert dataset.lazy_image_column and dataset.text_to_image == [0, 0, 1]
    assert dataset[2]["image"].getpixel((0, 0)) == (0, 0, 255)
    nlvr2 = NLVR2Dataset(
        datasets.Dataset.from_dict(
            {
                "images": [[make_image("red"), make_image("blue")]],
                "sentence": ["the left image is red"],
                "label": [True],
            }
        )
    )
    item = nlvr2[0]
    assert item["label"] == 1 and [im.getpixel((0, 0)) for im in item["images"]] == [(255, 0, 0), (0, 0, 255)]
    vqa = VQADataset(
        datasets.Dataset.from_dict({"image": [make_image("red")], "question": ["what color ?"], "answer": [["red"]]})
    )
    assert vqa[0]["answers"] == ["red"] and vqa[0]["answer_weights"] == [1.0] and vqa[0]["question_id"] == 0
    with pytest.raises(ValueError, match="no `image` column"):
        ImageTextDataset(datasets.Dataset.from_dict({"caption": ["a"]}))
    with pytest.raises(ValueError, match="Record 0: the image is missing"):
        ImageTextDataset(hf.cast_column("image", datasets.Image()).map(lambda _: {"image": None}))[0]


def test_an_unreadable_image_of_a_saved_dataset_names_the_record_and_the_folder(tmp_path) -> None:
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {"image": [make_image("red"), {"bytes": b"not an image", "path": None}], "caption": ["a", "b"]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "saved")
    dataset = ImageTextDataset(datasets.load_from_disk(tmp_path / "saved"))
    assert dataset[0]["image"].getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(ValueError, match=f"Record 1 in {tmp_path / 'saved'}: cannot read its `image` image"):
        dataset[1]


def test_vqa_dataset_weights(tmp_path) -> None:
    path, root = write_vqa_json(tmp_path, n=3)
    dataset = VQADataset(path, root)
    item = dataset[0]  # colour red: 7 + 2 "red", 1 "blue"
    assert item["question"] == "what color is the square ?" and item["question_id"] == 100
    assert item["answers"] == ["red", "blue"]
    assert item["answer_weights"] == pytest.approx([0.9, 0.1])
    assert dataset[1]["answers"] == ["green", "red", "blue"]
    assert dataset[1]["answer_weights"] == pytest.approx([0.7, 0.2, 0.1])
    assert dataset.references[1] == ["green"] * 7 + ["red", "red", "blue"]
    save_image(tmp_path / "x.png")
    explicit = VQADataset(
        [{"image": "x.png", "question": "q", "answer": ["a", "b", "a"], "answer_weight": [0.5, 0.3, 0.2]}], tmp_path
    )
    assert explicit[0]["answers"] == ["a", "b"] and explicit[0]["answer_weights"] == pytest.approx([0.7, 0.3])
    test_split = VQADataset([{"image": "x.png", "question": "q"}], tmp_path)
    assert test_split[0]["answers"] == [] and test_split[0]["answer_weights"] == []
    with pytest.raises(ValueError, match="Record 0: 1 answer weights for 2 answers"):
        VQADataset([{"image": "x.png", "question": "q", "answer": ["a", "b"], "answer_weight": [1.0]}], tmp_path)


def test_nlvr2_dataset_labels(tmp_path) -> None:
    path, root = write_nlvr2_json(tmp_path, n=4)
    dataset = NLVR2Dataset(path, root)
    assert dataset.labels == [1, 0, 1, 0]
    item = dataset[1]
    assert item["text"] == "the left image is green"
    assert [image.getpixel((0, 0)) for image in item["images"]] == [(0, 128, 0), (0, 0, 255)]
    records = json.loads(path.read_text())
    with pytest.raises(ValueError, match=r"Record 0: label 'maybe'"):
        NLVR2Dataset([{**records[0], "label": "maybe"}], root)
    with pytest.raises(ValueError, match=r"Record 0: label 2"):
        NLVR2Dataset([{**records[0], "label": 2}], root)
    with pytest.raises(ValueError, match="Record 0: `images` must hold exactly 2 images"):
        NLVR2Dataset([{**records[0], "images": records[0]["images"][:1]}], root)


# ---------------------------------------------------------------------------------------------------- collators


def test_image_text_collator(image_text: ImageTextDataset, processor) -> None:
    loader = DataLoader(image_text, batch_size=4, collate_fn=ImageTextCollator(processor))
    batch = next(iter(loader))
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "image_ids"}
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == (4, 8) and batch["input_ids"].dtype == torch.long
    assert batch["image_ids"].tolist() == [0, 0, 1, 1] and batch["image_ids"].dtype == torch.long
    images_only = ImageTextCollator(processor)([image_text.image_view()[i] for i in range(3)])
    assert set(images_only) == {"pixel_values", "image_ids"} and images_only["image_ids"].tolist() == [0, 1, 2]
    texts_only = ImageTextCollator(processor)([image_text.text_view()[i] for i in range(2)])
    assert set(texts_only) == {"input_ids", "attention_mask", "image_ids"}
    with pytest.raises(ValueError, match=r"item 1 has no 'image_id' field"):
        ImageTextCollator(processor)([image_text[0], {"image": make_image(), "text": "a"}])
    with pytest.raises(ValueError, match="empty batch"):
        ImageTextCollator(processor)([])


def test_caption_negatives_travel_from_records_to_the_batch(tmp_path, processor) -> None:
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        save_image(tmp_path / name, colour)
    records = [
        {"image": "a.png", "caption": ["a red square", "one red square"], "negative_caption": ["a blue square", "x"]},
        {"image": "b.png", "caption": "a blue square", "negative_caption": "a red square in the top left corner"},
    ]
    dataset = ImageTextDataset(records, image_root=tmp_path)
    assert dataset.negative_texts == ["a blue square", "x", "a red square in the top left corner"]
    assert dataset[2]["negative_text"] == "a red square in the top left corner"
    batch = ImageTextCollator(processor)([dataset[i] for i in range(3)])
    assert batch["itm_negative_input_ids"].shape == batch["input_ids"].shape == (3, 10)  # padded to the longest
    assert batch["pixel_values"].shape[0] == 3
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["itm_negative_input_ids"][0])
    assert tokens[:4] == ["[CLS]", "a", "blue", "square"]
    assert batch["itm_negative_attention_mask"].sum(dim=1).tolist() == [5, 3, 10]
    assert "negative_text" not in ImageTextDataset([{"image": "a.png", "caption": "a"}], tmp_path)[0]
    with pytest.raises(ValueError, match=r"Record 1: lacks `negative_caption`"):
        ImageTextDataset([records[0], {"image": "b.png", "caption": "a"}], image_root=tmp_path)
    with pytest.raises(ValueError, match="list of 2 strings"):
        ImageTextDataset([{**records[0], "negative_caption": ["only one"]}], image_root=tmp_path)
    # A string for a record of two captions: named as the string it is (it was reported as a list of one).
    with pytest.raises(ValueError, match=r"a single string fits a record of one caption\); got str 'only one'\.$"):
        ImageTextDataset([{**records[0], "negative_caption": "only one"}], image_root=tmp_path)
    # Pre-training data carries them the same way; with region texts, which have none, it is an error.
    pretraining = PretrainingDataset(records, image_root=tmp_path)
    assert pretraining.negative_texts == dataset.negative_texts and pretraining[0]["negative_text"] == "a blue square"
    region = {"caption": "a red square", "bbox": [0, 0, 4, 4]}
    with pytest.raises(ValueError, match="both `negative_caption`s and region texts"):
        PretrainingDataset([{**records[0], "regions": [region]}], image_root=tmp_path)


def test_region_texts_become_grounding_items(tmp_path, processor) -> None:
    save_image(tmp_path / "a.png", "red", size=(40, 20))  # not square: x and y normalise by their own side
    save_image(tmp_path / "b.png", "blue")
    records = [
        {"image": "a.png", "caption": "two shapes", "regions": [{"caption": "a red square", "bbox": [10, 0, 20, 10]}]},
        {"image": "b.png", "caption": ["a", "b"]},
        # X-VLM's names; the image of record 0 (so its id), two captions of one box.
        {"image": "a.png", "caption": "c", "elems": [{"caption": ["left", "the left one"], "bb": [0, 10, 4, 10]}]},
    ]
    dataset = PretrainingDataset(records, image_root=tmp_path)
    # Retrieval over this data ranks the captions only; the regions come after them.
    assert dataset.texts == ["two shapes", "a", "b", "c"]
    assert dataset.region_texts == ["a red square", "left", "the left one"]
    assert len(dataset) == 7 and dataset.num_images == 2
    first = dataset[4]
    assert first["text"] == "a red square" and first["image_id"] == dataset.text_to_image[0]
    assert first["bbox"] == pytest.approx((0.5, 0.25, 0.5, 0.5))  # (cx, cy, w, h) of x 10-30 / 40, y 0-10 / 20
    assert dataset[6]["bbox"] == pytest.approx((0.05, 0.75, 0.1, 0.5)) and dataset[6]["image_id"] == 0
    assert "bbox" not in dataset[0]
    with pytest.raises(IndexError):
        dataset[7]
    # Plain image-text data ignores regions: retrieval fine-tuning on the same file sees the captions only.
    assert len(ImageTextDataset(records, image_root=tmp_path)) == 4
    batch = PretrainingCollator(processor, seed=0)([dataset[0], dataset[4], dataset[6]])
    assert batch["target_bbox_mask"].tolist() == [False, True, True]
    assert torch.allclose(batch["target_bbox"][1:], torch.tensor([[0.5, 0.25, 0.5, 0.5], [0.05, 0.75, 0.1, 0.5]]))
    assert "target_bbox" not in PretrainingCollator(processor, seed=0)([dataset[0], dataset[1]])
    cropping = make_processor(tmp_path / "crop", image_size=16)
    cropping.image_processor.do_center_crop = True
    with pytest.raises(ValueError, match="do_center_crop"):
        PretrainingCollator(cropping)([dataset[4]])


@pytest.mark.parametrize(
    "region, message",
    [
        ("a red square", r"Record 0: `regions` must be a list"),
        (["a red square"], r"`regions` item 0 must be a dict"),
        ([{"caption": "", "bbox": [0, 0, 1, 1]}], r"`caption` must be a non-empty string"),
        ([{"caption": "x"}], r"item 0 has none of the fields \['bbox', 'bb'\]"),
        ([{"caption": "x", "bbox": [0, 0, 1]}], r"`bbox` must be \[x, y, width, height\]"),
        ([{"caption": "x", "bbox": [0, 0, 0, 5]}], "width and height > 0"),
        ([{"caption": "x", "bbox": [-1, 0, 5, 5]}], "x and y >= 0"),
        ([{"caption": "x", "bbox": [0, 0, float("nan"), 5]}], "finite"),
        ([{"caption": "x", "bbox": [0, "0", 5, 5]}], "4 finite numbers"),
    ],
)
def test_bad_regions_name_the_record_and_field(tmp_path, region, message) -> None:
    save_image(tmp_path / "a.png")
    with pytest.raises(ValueError, match=message):
        PretrainingDataset([{"image": "a.png", "caption": "c", "regions": region}], image_root=tmp_path)


def test_region_box_past_its_image_is_an_error_when_read_and_before_training(tmp_path) -> None:
    """The header check before training (`check_image_headers`) names a box past its image too: it surfaced only when
    a batch read the record, after training had started. The size is the upright image's (EXIF orientation 6:
    stored 32 wide x 20 high, shown 20 x 32)."""
    save_image(tmp_path / "a.png", size=32)
    region = {"caption": "x", "bbox": [20, 0, 20, 8]}
    dataset = PretrainingDataset([{"image": "a.png", "caption": "c", "regions": [region]}], image_root=tmp_path)
    message = r"Record 0: region box .* reaches past its image \(32 x 32 pixels, upright\)"
    with pytest.raises(ValueError, match=message):
        dataset[1]
    with pytest.raises(ValueError, match=message):
        dataset.check_image_headers()
    turned = PIL.Image.new("RGB", (32, 20), "red")
    exif = turned.getexif()
    exif[0x0112] = 6
    turned.save(tmp_path / "turned.jpg", exif=exif)
    fits = {"caption": "x", "bbox": [0, 0, 20, 32]}  # fits the upright 20 x 32 image, not the stored 32 x 20
    records = [{"image": "turned.jpg", "caption": "c", "regions": [fits]}, {"image": "a.png", "caption": "d"}]
    PretrainingDataset(records, image_root=tmp_path).check_image_headers()
    records[0]["regions"] = [{"caption": "x", "bbox": [0, 0, 32, 20]}]
    with pytest.raises(ValueError, match=r"Record 0: region box .* reaches past its image \(20 x 32 pixels, upright\)"):
        PretrainingDataset(records, image_root=tmp_path).check_image_headers()


def _text_items(texts: list[str]) -> list[dict]:
    return [{"image": make_image(), "text": text, "image_id": i} for i, text in enumerate(texts)]


def test_pretraining_collator_masks_like_xvlm(processor) -> None:
    texts = ["a picture of a red square", "two dog", "the left image is blue and the right image is red", "a"]
    collator = PretrainingCollator(processor, seed=0)
    batch = collator(_text_items(texts))
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "image_ids", "mlm_input_ids", "mlm_labels"}
    ids, mlm_ids, labels = batch["input_ids"], batch["mlm_input_ids"], batch["mlm_labels"]
    assert mlm_ids.shape == labels.shape == ids.shape
    masked = labels != -100
    # Labels hold the original ids exactly where masked; elsewhere the input is unchanged.
    assert torch.equal(labels[masked], ids[masked])
    assert torch.equal(mlm_ids[~masked], ids[~masked])
    # Never special tokens or padding.
    assert not masked[(ids == CLS_ID) | (ids == SEP_ID) | (ids == PAD_ID)].any()
    maskable = ((ids != CLS_ID) & (ids != SEP_ID) & (ids != PAD_ID)).sum(1)
    expected = torch.clamp((maskable.float() * 0.25).round(), min=1, max=8)  # whole words here are 1 token
    assert masked.sum(1).tolist() == expected.long().tolist()
    # Seedable.
    again = PretrainingCollator(processor, seed=0)(_text_items(texts))
    assert torch.equal(again["mlm_input_ids"], mlm_ids) and torch.equal(again["mlm_labels"], labels)


def test_pretraining_collator_caps_and_whole_words(processor) -> None:
    long_text = " ".join(COLOURS[:12])  # 11 single-token words (+ "red" again)
    capped = PretrainingCollator(processor, mlm_probability=1.0, max_masks=8, seed=1)(_text_items([long_text]))
    assert (capped["mlm_labels"] != -100).sum().item() == 8
    # "reds" = "red ##s": a whole word is masked together even when the target is one token.
    whole = PretrainingCollator(processor, seed=2)(_text_items(["reds"] * 16))
    assert ((whole["mlm_labels"][:, 1:3] != -100).sum(1) == 2).all()
    pieces = PretrainingCollator(processor, whole_word_mask=False, seed=2)(_text_items(["reds"] * 16))
    assert ((pieces["mlm_labels"] != -100).sum(1) == 1).all()


def test_pretraining_collator_80_10_10(processor) -> None:
    collator = PretrainingCollator(processor, mlm_probability=1.0, max_masks=8, seed=3)
    batch = collator(_text_items([" ".join(COLOURS[:8])] * 500))
    labels, mlm_ids = batch["mlm_labels"], batch["mlm_input_ids"]
    masked = labels != -100
    total = masked.sum().item()
    assert total == 500 * 8
    as_mask = (mlm_ids[masked] == MASK_ID).float().mean().item()
    unchanged = (mlm_ids[masked] == labels[masked]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.03 and abs(unchanged - 0.1) < 0.03
    random_ids = mlm_ids[masked & (mlm_ids != MASK_ID) & (mlm_ids != labels)]
    assert not torch.isin(random_ids, torch.tensor(processor.tokenizer.all_special_ids)).any()


def test_captioning_collator_labels(processor) -> None:
    items = [{"image": make_image(), "text": "a red square"}, {"image": make_image(), "text": "two big blue balls"}]
    batch = CaptioningCollator(processor, prompt="a picture of ")(items)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert tokens[:8] == ["[CLS]", "a", "picture", "of", "a", "red", "square", "[SEP]"]
    labels = batch["labels"]
    assert labels[:, :4].eq(-100).all()  # [CLS] + 3 prompt tokens
    assert labels[0, 4:8].tolist() == batch["input_ids"][0, 4:8].tolist()  # caption + [SEP]
    assert labels[0, 8:].eq(-100).all() and batch["attention_mask"][0, 8:].eq(0).all()
    assert labels[1, 4:].ne(-100).sum().item() == 6  # two big blue ball ##s [SEP]
    with pytest.raises(ValueError, match="does not tokenise to the same ids"):
        CaptioningCollator(processor, prompt="a pict")([{"image": make_image(), "text": "ure of a dog"}])
    with pytest.raises(ValueError, match="leaves no room"):
        CaptioningCollator(processor, prompt="a picture of ", max_length=5)


def test_vqa_collator(tmp_path, processor) -> None:
    path, root = write_vqa_json(tmp_path, n=3)
    dataset = VQADataset(path, root)
    batch = VQACollator(processor)([dataset[i] for i in range(3)])
    expected_keys = {"pixel_values", "input_ids", "attention_mask", "answer_input_ids", "answer_attention_mask"}
    assert set(batch) == expected_keys | {"answer_weights", "answer_counts"}
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["input_ids"].shape == (3, 8)
    assert batch["answer_counts"].tolist() == [2, 3, 2] and batch["answer_counts"].dtype == torch.long
    assert batch["answer_input_ids"].shape == (7, 3) and batch["answer_attention_mask"].shape == (7, 3)
    assert batch["answer_weights"].tolist() == pytest.approx([0.9, 0.1, 0.7, 0.2, 0.1, 0.8, 0.2])
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["answer_input_ids"][2].tolist())
    assert tokens == ["[CLS]", "green", "[SEP]"]
    unanswered = {"image": make_image(), "question": "q", "answers": [], "answer_weights": []}
    empty = VQACollator(processor, require_answers=False)([unanswered])
    assert empty["answer_input_ids"].shape == (0, 0) and empty["answer_counts"].tolist() == [0]
    with pytest.raises(ValueError, match="item 0 has 1 answers but 2 answer weights"):
        VQACollator(processor)([{"image": make_image(), "question": "q", "answers": ["a"], "answer_weights": [1, 2]}])


def test_nlvr2_collator(tmp_path, processor) -> None:
    path, root = write_nlvr2_json(tmp_path, n=4)
    batch = NLVR2Collator(processor)([NLVR2Dataset(path, root)[i] for i in range(4)])
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    assert batch["pixel_values"].shape == (4, 2, 3, 16, 16)
    assert batch["labels"].tolist() == [1, 0, 1, 0] and batch["labels"].dtype == torch.long
    # Pair order is kept: item 0 is red (left) then green (right).
    assert batch["pixel_values"][0, 0, 0, 0, 0] > 1.5 and batch["pixel_values"][0, 1, 0, 0, 0] < -1.5
    with pytest.raises(ValueError, match="exactly 2 images"):
        NLVR2Collator(processor)([{"images": [make_image()], "text": "a", "label": 1}])


# ---------------------------------------------------------------------------------------------------- bad input


def _write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path, data


def test_invalid_json_names_file_line_and_column(tmp_path) -> None:
    save_image(tmp_path / "a.png")
    path, data = _write_bytes(
        tmp_path / "train.json", b'[{"image": "a.png", "caption": "a"},\n {"image": "a.png" "caption"}]'
    )
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))} is not valid JSON: Expecting ',' delimiter at line 2, column 20"
    ):
        ImageTextDataset(path, tmp_path)
    jsonl, _ = _write_bytes(
        tmp_path / "train.jsonl", b'{"image": "a.png", "caption": "a"}\n{"image": "a.png", "caption": "b"}\n'
    )
    with pytest.raises(
        ValueError, match=r"train\.jsonl is not valid JSON: Extra data at line 2, column 1 \(a JSON Lines"
    ):
        ImageTextDataset(jsonl, tmp_path)
    latin1, _ = _write_bytes(tmp_path / "latin1.json", '[{"image": "a.png", "caption": "café"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.json is not UTF-8 text"):
        ImageTextDataset(latin1, tmp_path)
    assert path.read_bytes() == data  # nothing rewritten


def test_utf8_bom_is_read(tmp_path) -> None:
    save_image(tmp_path / "a.png")
    records = [{"image": "a.png", "caption": ["un café rouge", "a red square"]}]
    path, data = _write_bytes(tmp_path / "bom.json", codecs.BOM_UTF8 + json.dumps(records, ensure_ascii=False).encode())
    dataset = ImageTextDataset(path, tmp_path)
    assert dataset.texts == ["un café rouge", "a red square"] and len(dataset) == 2
    assert path.read_bytes() == data


def _expect(error: type[Exception], pattern: str, path, build, *args) -> None:
    """`build(*args)` raises `error` matching `pattern` and leaves the file at `path` as it was."""
    before = path.read_bytes()
    with pytest.raises(error, match=pattern):
        build(*args)
    assert path.read_bytes() == before


def test_wrong_value_types_name_file_record_and_field(tmp_path) -> None:
    save_image(tmp_path / "a.png")
    good = {"image": "a.png", "caption": "a red square"}
    cases = [  # (dataset class, bad record, expected message after "Record 1 in <file>: ")
        (
            ImageTextDataset,
            {"image": "a.png", "caption": 5},
            "`caption` must be a string or a non-empty list of strings, got int 5",
        ),
        (
            ImageTextDataset,
            {"image": "a.png", "text": ["ok", 3]},
            "`text` must be a string or a non-empty list of strings; item 1 is int 3",
        ),
        (
            ImageTextDataset,
            {"image": "a.png", "caption": []},
            "`caption` must be a string or a non-empty list of strings, got list",
        ),
        (ImageTextDataset, {"image": 7, "caption": "a"}, "`image` must be an image path \\(a string\\), got int 7"),
        (
            ImageTextDataset,
            {"image": "a.png", "caption": "a", "image_id": [1]},
            "`image_id` must be a string or a number, got list",
        ),
    ]
    vqa_good = {"image": "a.png", "question": "what color ?", "answer": ["red"]}
    cases += [
        (
            VQADataset,
            {**vqa_good, "answer": ["2", None]},
            "`answer` must be a string or a list of strings; item 1 is NoneType None",
        ),
        (
            VQADataset,
            {**vqa_good, "answer": ["2", 2]},
            "`answer` must be a string or a list of strings; item 1 is int 2 \\(write numbers as strings",
        ),
        (
            VQADataset,
            {**vqa_good, "answers": 2, "answer": None},
            "`answers` must be a string or a list of strings, got int 2",
        ),
        (VQADataset, {**vqa_good, "question": 7}, "`question` must be a string, got int 7"),
        (
            VQADataset,
            {**vqa_good, "answer_weight": ["heavy"]},
            "`answer_weight` must be a finite number >= 0 or a list of them .*; item 0 is str 'heavy'",
        ),
        (
            VQADataset,
            {**vqa_good, "answer_weight": "1.0"},
            "`answer_weight` must be a finite number >= 0 or a list of them .*; it is str '1.0'",
        ),
        (
            VQADataset,
            {**vqa_good, "answer": ["red", "blue"], "answer_weight": [1.0, -3.0]},
            "`answer_weight` must be a finite number >= 0 .*push the model away from its answer\\); item 1 is float",
        ),
        (VQADataset, {**vqa_good, "answer": ["red", " "]}, "`answer` item 1 is empty; an empty answer would train"),
    ]
    nlvr2_good = {"images": ["a.png", "a.png"], "sentence": "both are red", "label": True}
    cases += [
        (NLVR2Dataset, {**nlvr2_good, "label": "yes"}, "label 'yes' is not a boolean, 'True'/'False' or 0/1"),
        (NLVR2Dataset, {**nlvr2_good, "sentence": ["both"]}, "`sentence` must be a string, got list \\['both'\\]"),
    ]
    for number, (dataset_class, bad, message) in enumerate(cases):
        first = {ImageTextDataset: good, VQADataset: vqa_good, NLVR2Dataset: nlvr2_good}[dataset_class]
        path = tmp_path / f"bad{number}.json"
        path.write_text(json.dumps([first, bad]))
        pattern = rf"^Record 1 in {re.escape(str(path))}: {message}"
        _expect(ValueError, pattern, path, dataset_class, path, tmp_path)
        # The same records in memory: no file to name.
        with pytest.raises(ValueError, match=rf"^Record 1: {message}"):
            dataset_class([first, bad], tmp_path)
    # A good file reads the numbers it is given, unchanged.
    fine = VQADataset([{**vqa_good, "answer": ["2", "3"], "answer_weight": [1, 0.5]}], tmp_path)
    assert fine.answers == [["2", "3"]] and fine.answer_weights == [[1.0, 0.5]]


def test_missing_image_names_the_file(tmp_path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"image": "gone.png", "caption": "a"}]))
    with pytest.raises(
        FileNotFoundError, match=rf"^Record 0 in {re.escape(str(path))}: image file .*gone\.png not found"
    ):
        ImageTextDataset(path, tmp_path)
    # A null image is found when the records are read, not when a batch reaches it mid-training.
    path.write_text(json.dumps([{"image": None, "caption": "a"}]))
    with pytest.raises(ValueError, match=rf"^Record 0 in {re.escape(str(path))}: the image is missing \(null\)"):
        ImageTextDataset(path, tmp_path)


def test_empty_data_has_no_records(tmp_path) -> None:
    path = tmp_path / "train.json"
    path.write_text("[]")
    for dataset_class in (ImageTextDataset, VQADataset, NLVR2Dataset):
        message = rf"^{re.escape(str(path))} has no records \(an empty JSON list\); a {dataset_class.__name__} needs"
        _expect(ValueError, message, path, dataset_class, path, tmp_path)
    with pytest.raises(ValueError, match="^The list of records has no records"):
        VQADataset([], tmp_path)
    # What `finetune` and `prune` build from --train_file: the error comes before any training.
    for task in ("vqa", "retrieval", "nlvr2", "captioning"):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} has no records"):
            build_dataset(task, path, tmp_path)
    # An empty file (a failed export, `touch`) said "Expecting value: line 1 column 1".
    path.write_text("\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is empty: expected a JSON list of records\.$"):
        VQADataset(path, tmp_path)
    empty_hf = datasets.Dataset.from_dict({"image": [], "caption": []})
    with pytest.raises(ValueError, match=r"^The `datasets.Dataset` has no records \(0 rows\)"):
        ImageTextDataset(empty_hf)


def test_a_records_path_that_is_missing_or_a_folder_is_named_as_such(tmp_path, monkeypatch) -> None:
    """`--eval_file` given a folder said only "[Errno 21] Is a directory", and a mistyped file "[Errno 2] No such
    file or directory", after the model had loaded."""
    monkeypatch.chdir(tmp_path)
    folder = r"^\. is a folder: give the file \(a JSON list of records\); a `datasets` folder"
    with pytest.raises(IsADirectoryError, match=folder):
        build_dataset("retrieval", ".", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^nope\.json: no such file \(a JSON list of records\) here \("):
        build_dataset("vqa", "nope.json", tmp_path)


def test_16_bit_images_keep_their_gradient(tmp_path) -> None:
    gradient = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))  # (8, 64), left dark
    PIL.Image.fromarray(gradient).save(tmp_path / "deep.png")
    assert PIL.Image.open(tmp_path / "deep.png").mode == "I;16"
    image = ImageTextDataset([{"image": "deep.png", "caption": "a"}], tmp_path)[0]["image"]
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.shape == (8, 64, 3)
    assert (pixels == (gradient >> 8).astype(np.uint8)[..., None]).all()  # value >> 8, in every channel
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255 and len(np.unique(pixels)) == 64
    # Mode "I" (how some Pillow versions open 16-bit files) and float images in [0, 1] scale the same way.
    as_int = PIL.Image.fromarray(gradient.astype(np.int32))
    as_float = PIL.Image.fromarray((gradient / 65535).astype(np.float32))
    assert as_int.mode == "I" and as_float.mode == "F"
    records = [{"image": as_int, "caption": "a"}, {"image": as_float, "caption": "b"}]
    dataset = ImageTextDataset(records)
    assert (np.asarray(dataset[0]["image"]) == pixels).all()
    assert np.abs(np.asarray(dataset[1]["image"]).astype(int) - pixels).max() <= 1
    # Ranges that cannot be read as 16-bit or [0, 1] raise instead of being guessed.
    wide = ImageTextDataset([{"image": PIL.Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)), "caption": "a"}])
    with pytest.raises(
        ValueError, match=r"Record 0: image is a PIL image of mode 'I' with values in \[70000, 70000\], beyond 16 bits"
    ):
        wide[0]
    bright = ImageTextDataset(
        [{"image": PIL.Image.fromarray(np.full((4, 4), 200.0, dtype=np.float32)), "caption": "a"}]
    )
    with pytest.raises(
        ValueError, match=r"Record 0: image is a floating-point PIL image \(mode 'F'\) with values in \[200, 200\]"
    ):
        bright[0]


def test_decompression_bomb_names_the_record(tmp_path, monkeypatch) -> None:
    save_image(tmp_path / "big.png", size=32)  # 1024 pixels
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"image": "big.png", "caption": "a"}]))
    dataset = ImageTextDataset(path, tmp_path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # the error comes above 2 x the limit
    pattern = (
        rf"^Record 0 in {re.escape(str(path))}: image .*big\.png is too large to open safely: .*"
        r"raise Pillow's limit .*`PIL\.Image\.MAX_IMAGE_PIXELS = <pixels>`"
    )
    with pytest.raises(PIL.Image.DecompressionBombError, match=pattern):
        dataset[0]
    # The same from a `datasets.Image` column, which `datasets` decodes.
    lazy = ImageTextDataset(datasets.Dataset.from_dict({"image": [make_image()], "caption": ["a"]}))
    with pytest.raises(PIL.Image.DecompressionBombError, match=r"^Record 0: image is too large to open safely"):
        lazy[0]
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 4096)  # the hint works
    assert dataset[0]["image"].size == (32, 32) and lazy[0]["image"].size == (32, 32)


def test_vqa_batch_without_any_answers(processor) -> None:
    def item(answers: list[str], question_id: int) -> dict:
        weights = [1.0 / len(answers)] * len(answers) if answers else []
        return {
            "image": make_image(),
            "question": "q",
            "answers": answers,
            "answer_weights": weights,
            "question_id": question_id,
        }

    with pytest.raises(
        ValueError,
        match=r"^VQACollator: no record in this batch has answers; VQA training needs answers - is this a test split\? "
        r"\(question ids \[7, 8\]\)",
    ):
        VQACollator(processor)([item([], 7), item([], 8)])
    # Some without answers: they add no answer rows (the model's loss still divides by all B questions).
    batch = VQACollator(processor)([item([], 7), item(["red", "blue"], 8), item([], 9)])
    assert batch["answer_counts"].tolist() == [0, 2, 0] and batch["answer_input_ids"].shape[0] == 2
    assert batch["answer_weights"].tolist() == [0.5, 0.5] and batch["input_ids"].shape[0] == 3


def test_vqa_records_without_answers_beside_answered_ones_are_counted_in_a_warning() -> None:
    record = {"image": make_image(), "question": "what color ?"}
    with pytest.warns(UserWarning, match=r"2 of 3 record\(s\) have no answers \(records 0, 2; a misspelt `answer`"):
        VQADataset([{**record, "answr": ["red"]}, {**record, "answer": ["red"]}, {**record, "answer": []}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert VQADataset([record, record]).references == [[], []]  # a test split: nothing to warn about
    # Empty questions and sentences are counted as empty captions are.
    with pytest.warns(UserWarning, match=r"1 record\(s\) have an empty question \(records 1\)"):
        VQADataset([{**record, "answer": ["red"]}, {**record, "question": "  ", "answer": ["red"]}])
    pair = {"images": [make_image(), make_image()], "label": True}
    with pytest.warns(UserWarning, match=r"1 record\(s\) have an empty sentence \(records 0\)"):
        NLVR2Dataset([{**pair, "sentence": ""}, {**pair, "sentence": "both are red"}])


def test_pretraining_batch_with_nothing_to_mask(tmp_path, processor) -> None:
    from modeling_efficientvlm.loss_efficientvlm import masked_language_modeling_loss

    # Why: cross-entropy over no targets is NaN, and it would be summed into the loss.
    assert torch.isnan(masked_language_modeling_loss(torch.randn(2, 4, 8), torch.full((2, 4), -100)))
    collator = PretrainingCollator(processor, seed=0)
    with pytest.raises(
        ValueError,
        match=r"^PretrainingCollator: no text in this batch of 2 has a token to mask .* MLM loss would be NaN\. "
        r"Image ids \[0, 1\], texts: '', ' '",
    ):
        collator(_text_items(["", " "]))
    with pytest.raises(ValueError, match=r"no text in this batch of 1 has a token to mask"):
        collator(_text_items(["\u2603 \u2603"]))  # only unknown tokens: [UNK] is special, never masked
    # One maskable text is enough: the MLM loss averages over its targets, the empty text has none.
    batch = collator(_text_items(["", "a red square"]))
    assert (batch["mlm_labels"][0] == -100).all() and (batch["mlm_labels"][1] != -100).any()
    # The dataset warns about empty captions when it is built.
    save_image(tmp_path / "a.png")
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"image": "a.png", "caption": ["", "a"]}, {"image": "a.png", "caption": "ok"}]))
    with pytest.warns(
        UserWarning, match=rf"1 record\(s\) in {re.escape(str(path))} have an empty caption \(records 0\)"
    ):
        ImageTextDataset(path, tmp_path)
