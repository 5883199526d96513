"""Image backends: encoded bytes in, normalised float32 `[n, c, H, W]` out.

Two backends share one interface, `backend(encoded, seeds) -> DecodedImages`:

- `DaliImages` runs the DALI pipelines of `dali_pipelines.py` (CPU threads here, nvJPEG
  and GPU kernels when CUDA is available, where the images come back on the GPU).
- `PilImages` is the pure PyTorch/PIL fallback, for machines where DALI cannot be
  installed. Its augmentation is reproducible per sample from `seeds`; DALI draws from one
  random stream per pipeline, seeded when the pipeline is built.

`select_loader(data.loader)` picks one (`auto`: DALI when it imports) and logs the choice.
An image a decoder rejects is reported in `DecodedImages.failed` instead of raising: a
failed DALI batch is re-run one image at a time to find the culprits, since a DALI
pipeline cannot continue after a decoding error and is rebuilt.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from megatron_ibxl.config import RunConfig
from megatron_ibxl.data import pil_transforms
from megatron_ibxl.errors import UserError

logger = logging.getLogger(__name__)

Mode = Literal["train", "eval"]
_logged_choice: set[str] = set()


@dataclass
class DecodedImages:
    """Images that decoded, and the input positions that did not."""

    images: torch.Tensor
    """float32 [n, c, H, W], one row per entry of `ok`."""
    ok: list[int]
    """Positions in the input list of the rows of `images`."""
    failed: list[int]
    """Positions in the input list whose bytes did not decode."""


def _dali_version() -> str | None:
    try:
        import nvidia.dali as dali
    except Exception:
        return None
    return dali.__version__


def select_loader(choice: str) -> Literal["dali", "torch"]:
    """Resolve `data.loader` (auto, dali, torch) to the backend used; log it once.

    Raises UserError when `dali` is asked for and DALI does not import.
    """
    version = _dali_version()
    if choice == "dali" and version is None:
        raise UserError(
            "data.loader=dali: nvidia-dali does not import here; install "
            "nvidia-dali-cuda120 or set data.loader=auto to use the PyTorch fallback"
        )
    resolved = "dali" if choice in ("dali", "auto") and version is not None else "torch"
    if resolved not in _logged_choice:
        _logged_choice.add(resolved)
        if resolved == "dali":
            device = "gpu (nvJPEG)" if torch.cuda.is_available() else "cpu"
            logger.info("data loader: DALI %s on %s (data.loader=%s)", version, device, choice)
        else:
            reason = "asked for" if choice == "torch" else "nvidia-dali does not import"
            logger.info("data loader: PyTorch/PIL fallback (data.loader=%s, %s)", choice, reason)
    return resolved


class DaliImages:
    """Decode and transform batches with a DALI pipeline fed through external_source."""

    def __init__(self, mode: Mode, config: RunConfig, max_batch: int, seed: int):
        self._mode = mode
        self._config = config
        self._max_batch = max_batch
        self._seed = seed % (2**31)
        self._device = "gpu" if torch.cuda.is_available() else "cpu"
        self._pipe = self._build()

    def _build(self):
        from megatron_ibxl.data import dali_pipelines

        data = self._config.data
        common = dict(
            batch_size=self._max_batch,
            num_threads=max(1, data.num_threads),
            device_id=torch.cuda.current_device() if self._device == "gpu" else None,
            seed=self._seed,
            exec_pipelined=False,
            exec_async=False,
            prefetch_queue_depth=1,
            size=self._config.model.vision.image_size,
            mean=list(data.mean),
            std=list(data.std),
            device=self._device,
        )
        if self._mode == "train":
            pipe = dali_pipelines.train_pipeline(
                crop_scale_min=data.crop_scale_min,
                randaugment_n=data.randaugment_n,
                randaugment_m=data.randaugment_m,
                **common,
            )
        else:
            pipe = dali_pipelines.eval_pipeline(**common)
        pipe.build()
        return pipe

    def _run(self, arrays: list[np.ndarray]) -> torch.Tensor:
        self._pipe.feed_input("encoded", arrays)
        (output,) = self._pipe.run()
        if self._device == "cpu":
            return torch.from_numpy(output.as_array())
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = output.as_tensor()
        images = torch.empty(dense.shape(), dtype=torch.float32, device="cuda")
        feed_ndarray(dense, images, cuda_stream=torch.cuda.current_stream())
        return images

    def __call__(self, encoded: list[bytes], seeds: list[int] | None = None) -> DecodedImages:
        """Decode up to `max_batch` encoded images; `seeds` is not used (see module doc)."""
        arrays = [np.frombuffer(data, dtype=np.uint8) for data in encoded]
        if not arrays:
            return DecodedImages(self._empty(), [], [])
        try:
            return DecodedImages(self._run(arrays), list(range(len(arrays))), [])
        except RuntimeError:
            self._pipe = self._build()
        # One image at a time, rebuilding after each failure, to find the bad ones.
        rows, ok, failed = [], [], []
        for position, array in enumerate(arrays):
            try:
                rows.append(self._run([array]))
                ok.append(position)
            except RuntimeError:
                failed.append(position)
                self._pipe = self._build()
        images = torch.cat(rows) if rows else self._empty()
        return DecodedImages(images, ok, failed)

    def _empty(self) -> torch.Tensor:
        size = self._config.model.vision.image_size
        channels = self._config.model.vision.channels
        device = "cuda" if self._device == "gpu" else "cpu"
        return torch.empty(0, channels, size, size, device=device)

    def close(self) -> None:
        """Release the pipeline."""
        self._pipe = None


class PilImages:
    """Decode and transform images with PIL on a small thread pool (the fallback)."""

    def __init__(self, mode: Mode, config: RunConfig, seed: int):
        data = config.data
        self._mode = mode
        self._size = config.model.vision.image_size
        self._channels = config.model.vision.channels
        self._data = data
        self._seed = seed
        self._mean = np.asarray(data.mean, dtype=np.float32)
        self._std = np.asarray(data.std, dtype=np.float32)
        threads = max(1, data.num_threads)
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def _one(self, data: bytes, seed: int) -> np.ndarray | None:
        """One image as float32 [c, H, W], or None when its bytes do not decode."""
        size = self._size
        try:
            if self._mode == "eval":
                image = pil_transforms.decode_rgb(data, draft_size=size)
                image = pil_transforms.center_crop_resize(image, size)
            else:
                rng = np.random.default_rng([self._seed, seed])
                image = pil_transforms.decode_rgb(data)
                image = pil_transforms.random_resized_crop(
                    image, size, self._data.crop_scale_min, rng
                )
                n, m = self._data.randaugment_n, self._data.randaugment_m
                image = pil_transforms.rand_augment(image, n, m, rng)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None
        return pil_transforms.to_normalized_chw(image, self._mean, self._std)

    def __call__(self, encoded: list[bytes], seeds: list[int] | None = None) -> DecodedImages:
        """Decode images; sample i's augmentation is drawn from (seed, seeds[i])."""
        seeds = list(range(len(encoded))) if seeds is None else seeds
        if self._pool is None:
            arrays = [self._one(data, seed) for data, seed in zip(encoded, seeds)]
        else:
            arrays = list(self._pool.map(self._one, encoded, seeds))
        ok = [i for i, array in enumerate(arrays) if array is not None]
        failed = [i for i, array in enumerate(arrays) if array is None]
        if ok:
            images = torch.from_numpy(np.stack([arrays[i] for i in ok]))  # [n, c, H, W]
        else:
            images = torch.empty(0, self._channels, self._size, self._size)
        return DecodedImages(images, ok, failed)

    def close(self) -> None:
        """Stop the thread pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def build_backend(mode: Mode, config: RunConfig, max_batch: int, pipeline_seed: int):
    """The image backend `data.loader` selects, for training or evaluation batches.

    `pipeline_seed` seeds DALI's random stream; the fallback seeds each image from
    data.seed and the per-image seed passed with it instead.
    """
    if select_loader(config.data.loader) == "dali":
        return DaliImages(mode, config, max_batch, pipeline_seed)
    return PilImages(mode, config, config.data.seed)
