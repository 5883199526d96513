"""Image transforms in PIL and NumPy, for the fallback loader where DALI is not installed.

They mirror the DALI pipelines of `dali_pipelines.py` (random resized crop, RandAugment,
centre crop, normalisation) closely but not bit for bit: interpolation and the exact
magnitude ranges of some RandAugment operations differ. Every random choice comes from the
`numpy.random.Generator` passed in, so a sample's augmentation is reproducible from its
seed.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
_FILL = (128, 128, 128)
_MAGNITUDE_BINS = 31
"""RandAugment magnitudes are bins 0..30, as in DALI; bin 30 is the strongest."""


def decode_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB image; raises OSError or ValueError when they are bad.

    With `draft_size`, a JPEG is decoded at a reduced scale that still covers
    `draft_size` pixels on each side (much faster for large photos).
    """
    image = Image.open(io.BytesIO(data))
    if draft_size is not None and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    image.load()
    return image.convert("RGB")


def random_resized_crop(
    image: Image.Image, size: int, scale_min: float, rng: np.random.Generator
) -> Image.Image:
    """A random window of area fraction in [scale_min, 1] and aspect in [3/4, 4/3], resized
    to size x size. After 10 windows that do not fit, the centre square is used."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target_area = area * rng.uniform(scale_min, 1.0)
        aspect = math.exp(rng.uniform(math.log(_ASPECT_RANGE[0]), math.log(_ASPECT_RANGE[1])))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            box = (left, top, left + crop_w, top + crop_h)
            return image.resize((size, size), Image.BICUBIC, box=box)
    return center_crop_resize(image, size)


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The centred square of side min(width, height), resized to size x size."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))


def _signed(rng: np.random.Generator, value: float) -> float:
    return value if rng.random() < 0.5 else -value


def _affine(image: Image.Image, matrix: tuple) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, matrix, Image.BILINEAR, fillcolor=_FILL)


def _apply(name: str, image: Image.Image, level: float, rng: np.random.Generator):
    """One RandAugment operation at strength `level` in [0, 1]."""
    width, height = image.size
    if name == "rotate":
        return image.rotate(_signed(rng, 30.0 * level), Image.BILINEAR, fillcolor=_FILL)
    if name == "shear_x":
        return _affine(image, (1, _signed(rng, 0.3 * level), 0, 0, 1, 0))
    if name == "shear_y":
        return _affine(image, (1, 0, 0, _signed(rng, 0.3 * level), 1, 0))
    if name == "translate_x":
        return _affine(image, (1, 0, _signed(rng, 0.45 * width * level), 0, 1, 0))
    if name == "translate_y":
        return _affine(image, (1, 0, 0, 0, 1, _signed(rng, 0.45 * height * level)))
    enhancers = {
        "brightness": ImageEnhance.Brightness,
        "contrast": ImageEnhance.Contrast,
        "color": ImageEnhance.Color,
        "sharpness": ImageEnhance.Sharpness,
    }
    if name in enhancers:
        return enhancers[name](image).enhance(1.0 + _signed(rng, 0.9 * level))
    if name == "posterize":
        return ImageOps.posterize(image, 8 - round(4 * level))
    if name == "solarize":
        return ImageOps.solarize(image, 256 - round(256 * level))
    if name == "auto_contrast":
        return ImageOps.autocontrast(image)
    if name == "equalize":
        return ImageOps.equalize(image)
    return image  # identity


RANDAUGMENT_OPS = (
    "identity",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "brightness",
    "contrast",
    "color",
    "sharpness",
    "posterize",
    "solarize",
    "auto_contrast",
    "equalize",
)
"""The operations RandAugment draws from, uniformly and with replacement."""


def rand_augment(image: Image.Image, n: int, m: int, rng: np.random.Generator) -> Image.Image:
    """RandAugment (Cubuk et al., 2020): n operations drawn uniformly, each at magnitude
    bin m of 0..30, its sign drawn at random where the operation has one."""
    level = m / (_MAGNITUDE_BINS - 1)
    for op_index in rng.integers(0, len(RANDAUGMENT_OPS), size=n):
        image = _apply(RANDAUGMENT_OPS[int(op_index)], image, level, rng)
    return image


def to_normalized_chw(image: Image.Image, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """RGB image -> float32 [c, H, W] as `(pixel / 255 - mean) / std` per channel."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, c]
    pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # [H, W, c] -> [c, H, W]
