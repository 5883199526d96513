"""NVIDIA DALI pipelines: decode, crop, augment and normalise encoded images.

The pipelines take encoded image bytes through `fn.external_source` (named `encoded`), so
that the loader decides which samples go into each batch and in what order; DALI does the
decoding and the pixel work. Both return float32 `[b, c, H, W]` (layout CHW per sample),
with `H = W = size`, normalised as `(pixel / 255 - mean) / std`.

- `train_pipeline`: decode, random resized crop to `size` (area fraction in
  `[crop_scale_min, 1]`, aspect ratio in [3/4, 4/3]), RandAugment with `n` operations of
  magnitude `m` (of 31 bins, skipped when n is 0), normalise.
- `eval_pipeline`: decode, centre square crop of side min(H, W), resize to `size`,
  normalise. This equals resizing the short side to `size` and then centre cropping, but
  never allocates the resized long side of a very elongated image.

On a CPU machine build them with `device_id=None` and `device="cpu"`; on GPUs pass the
local device and `device="gpu"`, which decodes with nvJPEG (`mixed`) and augments on the
GPU. RandAugment uses conditionals, which DALI only supports in a pipeline function defined
in a source file (this one) and built with `enable_conditionals=True`.
"""

from __future__ import annotations

import os
import warnings

import nvidia.dali.math as dali_math
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug import rand_augment


def _hide_dali_deprecations() -> None:
    """Drop DALI's notices that its RandAugment calls operators by their old experimental
    names. DALI shows them whatever the warning filters say (it resets the filter while
    warning), so they are dropped where warnings are shown; other warnings pass through."""
    show = warnings.showwarning
    if getattr(show, "hides_dali_deprecations", False):
        return

    def filtered(message, category, filename, lineno, file=None, line=None):
        inside_dali = f"nvidia{os.sep}dali" in str(filename)
        if not (issubclass(category, DeprecationWarning) and inside_dali):
            show(message, category, filename, lineno, file, line)

    filtered.hides_dali_deprecations = True
    warnings.showwarning = filtered


_hide_dali_deprecations()

_ASPECT_RANGE = [3.0 / 4.0, 4.0 / 3.0]
"""Aspect ratios (width / height) the random resized crop samples from."""


def _decode(device: str):
    """External source of encoded bytes, decoded to RGB uint8 HWC on `device`."""
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, device="cpu")
    decoder_device = "mixed" if device == "gpu" else "cpu"
    return fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)


def _normalize(images, mean: list[float], std: list[float]):
    """uint8 HWC -> float32 CHW, `(pixel / 255 - mean) / std` per channel."""
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255.0 * value for value in mean],
        std=[255.0 * value for value in std],
    )


@pipeline_def(enable_conditionals=True)
def train_pipeline(
    size: int,
    crop_scale_min: float,
    randaugment_n: int,
    randaugment_m: int,
    mean: list[float],
    std: list[float],
    device: str = "cpu",
):
    """Training images: decode, random resized crop, RandAugment, normalise."""
    images = _decode(device)
    images = fn.random_resized_crop(
        images,
        size=[size, size],
        random_area=[crop_scale_min, 1.0],
        random_aspect_ratio=_ASPECT_RANGE,
    )
    if randaugment_n > 0:
        images = rand_augment.rand_augment(
            images, n=randaugment_n, m=randaugment_m, shape=[size, size]
        )
    return _normalize(images, mean, std)


@pipeline_def
def eval_pipeline(size: int, mean: list[float], std: list[float], device: str = "cpu"):
    """Evaluation images: decode, centre square crop, resize, normalise; no randomness."""
    images = _decode(device)
    shape = images.shape(dtype=types.FLOAT)  # [H, W, C] per sample
    side = dali_math.min(shape[0], shape[1])
    images = fn.crop(images, crop_h=side, crop_w=side)
    images = fn.resize(images, size=[size, size])
    return _normalize(images, mean, std)
