"""Image processor and processor: values, shapes, input checks, truncation reporting, save/load, remote code."""

from __future__ import annotations

import io
import json

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor, AutoProcessor

from modeling_efficientvlm.image_processing_efficientvlm import EfficientVLMImageProcessor
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor
from trainers.data.datasets import _to_rgb

from .data_utils import CLS_ID, PAD_ID, SEP_ID, make_image, make_image_processor, make_processor
from .remote_code_utils import load_in_clean_subprocess

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def _expected(rgb: tuple[int, int, int]) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float) / 255 - CLIP_MEAN) / CLIP_STD


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> EfficientVLMProcessor:
    return make_processor(tmp_path_factory.mktemp("processor"), image_size=32, max_length=12)


# ---------------------------------------------------------------------------------------------- image processor


def test_defaults_are_the_clip_recipe() -> None:
    image_processor = EfficientVLMImageProcessor()
    assert (image_processor.size.height, image_processor.size.width) == (224, 224)
    assert image_processor.resample == PIL.Image.Resampling.BICUBIC
    assert image_processor.do_center_crop is False
    assert torch.allclose(torch.tensor(image_processor.image_mean), CLIP_MEAN)
    assert torch.allclose(torch.tensor(image_processor.image_std), CLIP_STD)
    pixel_values = image_processor(make_image("red", (50, 30)), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224) and pixel_values.dtype == torch.float32


def test_solid_colour_is_rescaled_and_normalised() -> None:
    pixel_values = make_image_processor(32)(make_image((255, 128, 0), (50, 40)), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    expected = _expected((255, 128, 0))[:, None, None].expand(3, 32, 32)
    torch.testing.assert_close(pixel_values[0], expected, atol=1e-5, rtol=0)


def test_numpy_torch_and_pil_inputs_agree() -> None:
    image_processor = make_image_processor(16)
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    reference = image_processor(PIL.Image.fromarray(hwc), return_tensors="pt")["pixel_values"]
    variants = {
        "numpy uint8 HWC": hwc,
        "numpy float [0, 1]": hwc.astype(np.float32) / 255,
        "numpy float [0, 255]": hwc.astype(np.float64),
        "torch uint8 CHW": torch.from_numpy(hwc).permute(2, 0, 1),
        "torch float CHW [0, 1]": torch.from_numpy(hwc).permute(2, 0, 1).float() / 255,
        "numpy CHW with input_data_format": hwc.transpose(2, 0, 1),
    }
    for name, image in variants.items():
        kwargs = {"input_data_format": "channels_first"} if "input_data_format" in name else {}
        out = image_processor(image, return_tensors="pt", **kwargs)["pixel_values"]
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0, msg=name)


def test_grayscale_and_rgba_become_rgb() -> None:
    image_processor = make_image_processor(8)
    gray = image_processor(np.full((10, 10), 200, dtype=np.uint8), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(gray, _expected((200, 200, 200))[:, None, None].expand(3, 8, 8), atol=1e-5, rtol=0)
    # Fully transparent pixels are composited on white.
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    out = image_processor(rgba, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out, _expected((255, 255, 255))[:, None, None].expand(3, 8, 8), atol=1e-5, rtol=0)


def test_batches_lists_and_groups() -> None:
    image_processor = make_image_processor(8)
    images = [make_image("red", 10), make_image("blue", (12, 7)), np.zeros((5, 6, 3), np.uint8)]
    assert image_processor(images, return_tensors="pt")["pixel_values"].shape == (3, 3, 8, 8)
    assert image_processor(torch.zeros(4, 3, 9, 9), return_tensors="pt")["pixel_values"].shape == (4, 3, 8, 8)
    pairs = [[make_image("red"), make_image("blue")], (make_image("green"), make_image("white"))]
    grouped = image_processor(pairs, return_tensors="pt")["pixel_values"]
    assert grouped.shape == (2, 2, 3, 8, 8)
    # Group order is kept: pair 0, image 1 is blue.
    torch.testing.assert_close(grouped[0, 1, :, 0, 0], _expected((0, 0, 255)), atol=1e-5, rtol=0)
    assert isinstance(image_processor(images, return_tensors="np")["pixel_values"], np.ndarray)


def test_16_bit_and_float_pil_images_are_scaled_to_8_bits_as_the_training_data_reader_does() -> None:
    image_processor = make_image_processor(4)
    values = np.array([[0, 257, 32896, 65535]] * 4, dtype=np.uint16)  # value >> 8: 1, 128, 255
    eight_bits = image_processor(PIL.Image.fromarray(np.array([[0, 1, 128, 255]] * 4, np.uint8)))["pixel_values"]
    png = io.BytesIO()
    PIL.Image.fromarray(values).save(png, format="PNG")
    images = {
        "I;16": PIL.Image.fromarray(values),
        "I;16B": PIL.Image.frombytes("I;16B", (4, 4), values.astype(">u2").tobytes()),
        "I;16L": PIL.Image.frombytes("I;16L", (4, 4), values.astype("<u2").tobytes()),
        "I": PIL.Image.fromarray(values.astype(np.int32)),
        "16-bit PNG": PIL.Image.open(png),
        "F": PIL.Image.fromarray(np.array([[0, 1, 128, 255]] * 4, np.float32) / 255),
    }
    for name, image in images.items():
        # Before, convert("RGB") clipped every value above 255: all white but the zeros.
        np.testing.assert_array_equal(image_processor(image)["pixel_values"], eight_bits, err_msg=name)
        # The values a model trained on this image through `trainers.data` saw.
        trained = image_processor(_to_rgb(image, "here", ""))["pixel_values"]
        np.testing.assert_array_equal(image_processor(image)["pixel_values"], trained, err_msg=name)
    with pytest.raises(ValueError, match=r"mode 'I' with values in \[0, 70000\], beyond 16 bits"):
        image_processor(PIL.Image.fromarray(np.array([[0, 70000]] * 2, np.int32)))
    with pytest.raises(ValueError, match=r"Image 1 is a floating-point PIL image \(mode 'F'\) with values in \[0, 2\]"):
        image_processor([make_image(), PIL.Image.fromarray(np.array([[0, 2]] * 2, np.float32))])


def test_to_rgb_image_gives_pipelines_what_the_processor_reads() -> None:
    """Pipelines open images with transformers' `load_image` (a plain `convert("RGB")`): a transparent corner kept
    its own colour (black) and 16-bit values clipped to white. `to_rgb_image` first gives the processor's values."""
    from transformers.image_utils import load_image

    image_processor = make_image_processor(image_size=8)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[:4, :4, 3], rgba[4:, :, 3] = 200, 0, 255  # red, with a transparent top-left corner
    sixteen = PIL.Image.fromarray(np.full((8, 8), 40_000, dtype=np.uint16))  # mode "I;16": 40000 >> 8 = 156
    for image in (PIL.Image.fromarray(rgba), sixteen):
        expected = image_processor(image, return_tensors="pt")["pixel_values"]
        converted = image_processor.to_rgb_image(image)
        assert converted.mode == "RGB" and converted.size == image.size
        torch.testing.assert_close(
            image_processor(load_image(converted), return_tensors="pt")["pixel_values"], expected
        )
        piped = image_processor(load_image(image), return_tensors="pt")["pixel_values"]
        assert (piped - expected).abs().max() > 1.0  # what a pipeline fed the image itself sees
    assert image_processor.to_rgb_image(torch.zeros(3, 8, 8)).getpixel((0, 0)) == (0, 0, 0)
    with pytest.raises(ValueError, match="takes one image"):
        image_processor.to_rgb_image([sixteen, sixteen])


@pytest.mark.parametrize(
    "flags",
    [{}, {"do_rescale": False}, {"do_normalize": False}, {"do_rescale": False, "do_normalize": False}],
)
def test_batched_values_equal_the_per_image_backend_bit_for_bit(
    flags: dict[str, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.image_processing_backends import PilBackend

    rng = np.random.default_rng(0)
    # Images already at the size (not resized) and others (resized by PIL's bicubic), noise so every value occurs.
    images = [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(16, 16), (20, 31)]]
    images.append(PIL.Image.fromarray(rng.integers(0, 65536, (18, 16), dtype=np.uint16)))  # 16 bits, mode "I;16"
    image_processor = make_image_processor(16)
    batched = image_processor(images, return_tensors="np", **flags)["pixel_values"]
    monkeypatch.setattr(EfficientVLMImageProcessor, "_preprocess", PilBackend._preprocess)
    per_image = image_processor(images, return_tensors="np", **flags)["pixel_values"]
    assert batched.dtype == per_image.dtype == np.float32 and batched.shape == (3, 3, 16, 16)
    np.testing.assert_array_equal(batched, per_image)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((1, 2, 3, 4, 5), np.uint8), "Image 0 has shape"),
        (np.zeros((8, 8, 2), np.uint8), "2 channels"),
        (torch.zeros(5, 8, 8), "5 channels"),
        ("picture.jpg", "unsupported type str"),
        ([], "No images"),
        ([[make_image()], [make_image(), make_image()]], "same, non-zero number"),
        ([make_image(), [make_image()]], "Mixed nesting"),
        (np.full((4, 4, 3), 300.0), r"values in \[300, 300\]"),
        (np.full((4, 4, 3), np.nan), "NaN"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
    ],
)
def test_bad_images_raise_clear_errors(images: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_image_processor(8)(images, return_tensors="pt")


def test_image_processor_save_load_round_trip(tmp_path) -> None:
    image_processor = make_image_processor(24)
    image_processor.save_pretrained(tmp_path)
    for loaded in (EfficientVLMImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is EfficientVLMImageProcessor
        assert (loaded.size.height, loaded.size.width) == (24, 24)
        assert loaded.resample == PIL.Image.Resampling.BICUBIC
        image = make_image("purple", (30, 20))
        torch.testing.assert_close(
            loaded(image, return_tensors="pt")["pixel_values"],
            image_processor(image, return_tensors="pt")["pixel_values"],
        )
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["auto_map"] == {
        "AutoImageProcessor": "image_processing_efficientvlm.EfficientVLMImageProcessor"
    }


# ---------------------------------------------------------------------------------------------------- processor


def test_processor_outputs(processor: EfficientVLMProcessor) -> None:
    batch = processor(
        images=[make_image("red"), make_image("blue")], text=["a red square", "a big blue ball and a box"]
    )
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask"}
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert tokens == ["[CLS]", "a", "red", "square", "[SEP]", "[PAD]", "[PAD]", "[PAD]", "[PAD]"]
    # Padding to the longest text of the batch (9 tokens), not to max_length.
    assert batch["input_ids"].shape == (2, 9)
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 4
    assert batch["input_ids"][1].tolist()[0] == CLS_ID and batch["input_ids"][1].tolist()[-1] == SEP_ID
    assert processor.batch_decode(batch["input_ids"], skip_special_tokens=True) == [
        "a red square",
        "a big blue ball and a box",
    ]
    assert processor.decode(batch["input_ids"][0], skip_special_tokens=True) == "a red square"
    text_only = processor(text="what color is the star ?")
    assert set(text_only) == {"input_ids", "attention_mask"} and text_only["input_ids"].shape == (1, 8)


def test_processor_truncation_is_counted_and_warned(processor: EfficientVLMProcessor) -> None:
    long_text = " ".join(["red"] * 20)
    seen, truncated = processor.num_texts_seen, processor.num_texts_truncated
    with pytest.warns(UserWarning, match="1 of 2 texts were longer than max_length=12"):
        batch = processor(text=[long_text, "a red square"])
    assert batch["input_ids"].shape == (2, 12)
    assert batch["input_ids"][0, -1].item() == SEP_ID
    assert batch["input_ids"][1, 5:].tolist() == [PAD_ID] * 7
    assert (processor.num_texts_seen - seen, processor.num_texts_truncated - truncated) == (2, 1)
    with pytest.warns(UserWarning, match="max_length=4"):
        assert processor(text="a red square", max_length=4)["input_ids"].shape == (1, 4)
    with pytest.raises(ValueError, match="longer than max_length=12"):
        processor(text=long_text, truncation=False)


def test_processor_pairs_and_bad_calls(processor: EfficientVLMProcessor) -> None:
    pairs = [[make_image("red"), make_image("blue")], [make_image("green"), make_image("white")]]
    batch = processor(images=pairs, text=["the left image is red", "the right image is white"])
    assert batch["pixel_values"].shape == (2, 2, 3, 32, 32) and batch["input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="2 images .* but 1 texts"):
        processor(images=[make_image(), make_image()], text=["a red square"])
    with pytest.raises(ValueError, match="Give `images`, `text` or both"):
        processor()
    with pytest.raises(ValueError, match="list of strings"):
        processor(text=[1, 2])
    with pytest.raises(ValueError, match="at least 2"):
        EfficientVLMProcessor(processor.image_processor, processor.tokenizer, max_length=1)


def test_processor_save_and_auto_load(processor: EfficientVLMProcessor, tmp_path) -> None:
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["auto_map"] == {"AutoProcessor": "processing_efficientvlm.EfficientVLMProcessor"}
    assert saved["max_length"] == 12
    # The remote-code files are copied flat next to the configs.
    for name in ("processing_efficientvlm.py", "image_processing_efficientvlm.py"):
        assert (tmp_path / name).is_file()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is EfficientVLMProcessor and loaded.max_length == 12
    inputs = {"images": [make_image("red"), make_image("pink")], "text": ["a red square", "a pink star"]}
    expected, actual = processor(**inputs), loaded(**inputs)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])


def test_processor_loads_as_remote_code_without_the_package(processor: EfficientVLMProcessor, tmp_path) -> None:
    save_dir = tmp_path / "saved"
    processor.save_pretrained(save_dir)
    inputs = {"images": [make_image("red"), make_image("pink")], "text": ["a red square", "a pink star"]}
    expected = processor(**inputs)
    out = load_in_clean_subprocess(save_dir, "AutoProcessor", inputs, outputs=["image_processor"], method="__call__")
    assert out["module"].startswith("transformers_modules.")
    assert out["image_processor"]["module"].startswith("transformers_modules.")
    assert out["output"]["input_ids"].tolist() == expected["input_ids"].tolist()
    torch.testing.assert_close(out["output"]["pixel_values"], expected["pixel_values"])
