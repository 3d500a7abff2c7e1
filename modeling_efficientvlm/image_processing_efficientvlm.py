"""Image processor for EfficientVLM: square bicubic resize, RGB, rescale to [0, 1], CLIP normalisation."""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension, PILImageResampling


# The PIL backend (not the torchvision one) because torchvision is not a dependency of this project; only the
# resize is per image, the rescale and normalisation run on the whole batch (`_preprocess`).
class EfficientVLMImageProcessor(PilBackend):
    r"""
    Turns images into the `pixel_values` the EfficientVLM vision encoder reads (the X-VLM / CLIP recipe):
    convert to RGB (transparency composited on white), resize to a square `size` with bicubic resampling,
    rescale by 1/255 and normalise with the OpenAI CLIP mean and standard deviation.

    Accepted inputs (a single image or a list of them):
    - `PIL.Image.Image` of any mode;
    - `np.ndarray` in (H, W), (H, W, C) with C in {1, 3, 4}, or a batch (B, H, W, C);
    - `torch.Tensor` in (H, W), (C, H, W) with C in {1, 3, 4}, or a batch (B, C, H, W);
    - a list of equal-length lists/tuples of the above (e.g. NLVR2 image pairs), giving
      `pixel_values` of shape (B, K, 3, H, W).
    Pass `input_data_format="channels_first"` / `"channels_last"` to override the default layout
    (channels last for NumPy, channels first for torch).

    Integer images must hold values in [0, 255]. Floating-point images with every value in [0, 1] are taken
    as already scaled (e.g. the output of `torchvision.transforms.ToTensor`) and multiplied by 255; other
    floating-point images must lie in [0, 255]. Images are quantised to uint8 before resizing, as PIL does.
    16-bit grayscale PIL images (modes "I;16", "I;16L", "I;16B", "I;16N", and "I" with values in [0, 65535], as
    Pillow may open 16-bit PNGs) are scaled to 8 bits by the type's range, value >> 8, and PIL float images (mode
    "F") in [0, 1] by 255, as the training data reader (`trainers.data`) does; mode "I" beyond 16 bits and mode
    "F" outside [0, 1] have no known range and raise.

    Returns a `BatchFeature` with `pixel_values` of shape (B, 3, size, size) (or (B, K, 3, size, size)).
    """

    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": 224, "width": 224}
    default_to_square = True
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    model_input_names = ["pixel_values"]

    def _preprocess_image_like_inputs(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        # Overridden so the flattening, validation and RGB conversion are ours: the generic path guesses the
        # channel axis, which is ambiguous for tiny images (e.g. 3x3x3), and silently accepts odd shapes.
        return_tensors = kwargs.pop("return_tensors", None)
        input_data_format = kwargs.pop("input_data_format", None)
        flat, group_size = _flatten_images(images)
        prepared = [self._to_rgb_chw_uint8(image, index, input_data_format) for index, image in enumerate(flat)]
        processed = self._preprocess(prepared, *args, return_tensors=None, **kwargs)["pixel_values"]
        pixel_values = processed if isinstance(processed, np.ndarray) else np.stack(processed).astype(np.float32)
        if group_size is not None:
            pixel_values = pixel_values.reshape(len(flat) // group_size, group_size, *pixel_values.shape[1:])
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: Any,
        resample: Any,
        do_center_crop: bool,
        crop_size: Any,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
        do_pad: bool | None,
        pad_size: Any,
        return_tensors: Any,
        **kwargs: Any,
    ) -> BatchFeature:
        """
        The PIL backend's per-image resize, rescale and normalise, for the batch at once: an image already at
        `size` is not resized (PIL would return a copy), and since every pixel is uint8 here, rescaling and
        normalising is one lookup per channel in a (3, 256) table computed with the backend's own arithmetic
        (float64 rescale, float32 normalise), so the values are those of the per-image path, bit for bit.
        Returns `pixel_values` as one float32 array (N, 3, H, W). Cropping and padding go the backend's way.
        """
        if do_center_crop or do_pad or not size.height or not size.width:
            return super()._preprocess(
                images, do_resize, size, resample, do_center_crop, crop_size, do_rescale, rescale_factor,
                do_normalize, image_mean, image_std, do_pad, pad_size, return_tensors, **kwargs,
            )  # fmt: skip
        target = (size.height, size.width)
        if do_resize:
            images = [
                image if image.shape[1:] == target else self.resize(image=image, size=size, resample=resample)
                for image in images
            ]
        if len({image.shape for image in images}) != 1:  # not resized: sizes may differ, as the backend allows
            return super()._preprocess(
                images, False, size, resample, do_center_crop, crop_size, do_rescale, rescale_factor,
                do_normalize, image_mean, image_std, do_pad, pad_size, return_tensors, **kwargs,
            )  # fmt: skip
        table = self._value_table(do_rescale, rescale_factor, do_normalize, image_mean, image_std)
        stacked = np.stack(images)  # (N, 3, H, W) uint8
        pixel_values = np.empty(stacked.shape, dtype=np.float32)
        for channel in range(stacked.shape[1]):
            pixel_values[:, channel] = table[channel][stacked[:, channel]]
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    @staticmethod
    def _value_table(
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
    ) -> np.ndarray:
        """(3, 256) float32: what the per-image path turns each uint8 value of each channel into."""
        values = np.arange(256, dtype=np.uint8)
        scaled = (values.astype(np.float64) * rescale_factor if do_rescale else values).astype(np.float32)
        table = np.repeat(scaled[None], 3, axis=0)
        if do_normalize:
            mean = np.broadcast_to(np.asarray(image_mean, dtype=np.float32), (3,))
            std = np.broadcast_to(np.asarray(image_std, dtype=np.float32), (3,))
            table = (table - mean[:, None]) / std[:, None]
        return table

    def to_rgb_image(self, image: Any, input_data_format: str | ChannelDimension | None = None) -> PIL.Image.Image:
        """One image (any input `__call__` takes) as the 8-bit RGB PIL image this processor reads: transparency
        composited on white, 16-bit values scaled to 8 bits. Pipelines open every image with transformers'
        `load_image`, whose plain `convert("RGB")` keeps what transparent pixels hold (often black) and clips
        16-bit values to white before this processor sees them; pass them `to_rgb_image(image)` instead, and they
        see what training saw."""
        if isinstance(image, (list, tuple)):
            raise ValueError("`to_rgb_image` takes one image; call it per image.")
        return PIL.Image.fromarray(self._to_rgb_chw_uint8(image, 0, input_data_format).transpose(1, 2, 0))

    @staticmethod
    def _to_rgb_chw_uint8(image: Any, index: int, input_data_format: str | ChannelDimension | None) -> np.ndarray:
        """Converts one image to a (3, H, W) uint8 array; `index` is its position in the flattened batch."""
        if isinstance(image, PIL.Image.Image):
            image = pil_to_8_bits(image, f"Image {index}")
            return np.ascontiguousarray(convert_to_rgb(image, return_numpy=True).transpose(2, 0, 1))
        if isinstance(image, torch.Tensor):
            array = image.detach().cpu().numpy()
            channels_first = True
        elif isinstance(image, np.ndarray):
            array = image
            channels_first = False
        else:
            raise ValueError(
                f"Image {index} has unsupported type {type(image).__name__}; expected a PIL.Image.Image, a numpy "
                "array or a torch tensor (load files or URLs with PIL first)."
            )
        if input_data_format is not None:
            channels_first = ChannelDimension(input_data_format) == ChannelDimension.FIRST
        if array.ndim == 2:
            array = array[:, :, None]
        elif array.ndim == 3:
            if channels_first:
                array = array.transpose(1, 2, 0)
        else:
            raise ValueError(
                f"Image {index} has shape {tuple(array.shape)}; expected 2 (H, W) or 3 dimensions "
                f"({'(C, H, W)' if channels_first else '(H, W, C)'})."
            )
        if array.shape[-1] not in (1, 3, 4):
            layout = "(C, H, W)" if channels_first else "(H, W, C)"
            raise ValueError(
                f"Image {index} has shape {tuple(image.shape)} read as {layout} with {array.shape[-1]} channels; "
                "expected 1, 3 or 4 channels. Use `input_data_format` if the channel axis is elsewhere."
            )
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise ValueError(f"Image {index} is empty (shape {tuple(image.shape)}).")
        array = _to_uint8(array, index)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1]]
        pil_image = PIL.Image.fromarray(array[:, :, 0] if mode == "L" else array, mode=mode)
        return np.ascontiguousarray(convert_to_rgb(pil_image, return_numpy=True).transpose(2, 0, 1))


# Single-channel PIL modes with more than 8 bits per pixel ("I" is how Pillow opens 16-bit PNG, TIFF and PGM files).
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def pil_to_8_bits(image: PIL.Image.Image, what: str) -> PIL.Image.Image:
    """A PIL image whose values may exceed 8 bits (`HIGH_BIT_DEPTH_MODES`, floats "F") as an 8-bit "L" image
    (others unchanged): `convert("RGB")` would clip every value above 255 to white. 16 bits scale by the type's
    range, value >> 8, not by the image's own (a dark image stays dark; an "I" image must fit in [0, 65535]);
    floats must lie in [0, 1] and scale by 255; other ranges raise, naming the image as `what` (e.g. "Image 2",
    "Record 4 in train.json: image a.png"). The image processor and the training data reader both use it, so a
    model sees at inference the values it was trained on."""
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        if pixels.size and not (np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0):
            raise ValueError(
                f"{what} is a floating-point PIL image (mode 'F') with values in [{np.nanmin(pixels):g}, "
                f"{np.nanmax(pixels):g}]; only [0, 1] is understood. Convert it to 8 bits ('L' or 'RGB') first."
            )
        return PIL.Image.fromarray(np.round(pixels * 255).astype(np.uint8))
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image
    pixels = np.asarray(image).astype(np.int64)
    if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
        raise ValueError(
            f"{what} is a PIL image of mode {image.mode!r} with values in [{pixels.min()}, {pixels.max()}], beyond "
            "16 bits ([0, 65535]), so of unknown range; convert it to 8 bits ('L' or 'RGB') first."
        )
    return PIL.Image.fromarray((pixels >> 8).astype(np.uint8))


def _to_uint8(array: np.ndarray, index: int) -> np.ndarray:
    """Maps an (H, W, C) array to uint8 following the value-range rules of the class docstring."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"Image {index} has dtype {array.dtype}; expected an integer or floating-point array.")
    if not np.isfinite(array).all():
        raise ValueError(f"Image {index} contains NaN or infinite values.")
    low, high = float(array.min()), float(array.max())
    if np.issubdtype(array.dtype, np.floating) and low >= 0.0 and high <= 1.0:
        array = array * 255.0
    elif low < 0.0 or high > 255.0:
        raise ValueError(
            f"Image {index} has values in [{low:g}, {high:g}]; expected [0, 255] (or [0, 1] for float images)."
        )
    return np.round(array).astype(np.uint8)


def _flatten_images(images: Any) -> tuple[list[Any], int | None]:
    """
    Flattens the accepted input structures into a list of single images.

    Returns the list and, for a list of groups (e.g. image pairs), the common group size (else `None`).
    """
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images), None  # a batch (B, H, W, C) or (B, C, H, W)
    if not isinstance(images, (list, tuple)):
        return [images], None
    if len(images) == 0:
        raise ValueError("No images were given (empty list).")
    nested = [isinstance(item, (list, tuple)) for item in images]
    if not any(nested):
        return list(images), None
    if not all(nested):
        raise ValueError("Mixed nesting: pass a list of images or a list of image groups (e.g. pairs), not both.")
    sizes = {len(group) for group in images}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"Every image group must hold the same, non-zero number of images; got sizes {sorted(sizes)}.")
    return [image for group in images for image in group], sizes.pop()


__all__ = ["EfficientVLMImageProcessor"]
