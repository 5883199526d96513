"""Evaluation images: both backends centre-crop, normalise and report bad files by index."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from megatron_ibxl.config import RunConfig
from megatron_ibxl.data.eval_images import iter_eval_images

SIZE = 16


def _config(loader: str) -> RunConfig:
    config = RunConfig()
    config.model.vision.image_size = SIZE
    config.data.loader = loader
    config.data.num_threads = 1
    return config


def _write(path, width: int, height: int, colour=(200, 40, 90), fmt: str = "JPEG") -> str:
    Image.new("RGB", (width, height), colour).save(path, fmt, quality=98)
    return str(path)


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_flat_images_normalise_to_the_expected_value(tmp_path, loader):
    colour = (200, 40, 90)
    # Shapes a photo set can hold: square, wide, 1x1, 10000x50, and a PNG.
    paths = [
        _write(tmp_path / "a.jpg", 40, 40, colour),
        _write(tmp_path / "b.jpg", 64, 20, colour),
        _write(tmp_path / "c.jpg", 1, 1, colour),
        _write(tmp_path / "d.jpg", 10000, 50, colour),
        _write(tmp_path / "e.png", 30, 50, colour, "PNG"),
    ]
    config = _config(loader)
    batches = list(iter_eval_images(paths, config, batch_size=3))
    assert [len(b.indices) for b in batches] == [3, 2]
    images = np.concatenate([b.images.cpu().numpy() for b in batches])
    assert images.shape == (5, 3, SIZE, SIZE) and images.dtype == np.float32

    # A flat colour stays flat under any crop and resize; the reference is the
    # normalisation formula. JPEG rounding moves a pixel by a few levels: 4/255 / std.
    mean, std = np.array(config.data.mean), np.array(config.data.std)
    expected = (np.array(colour) / 255.0 - mean) / std
    tolerance = 4 / 255 / std.min()
    assert np.abs(images - expected[None, :, None, None]).max() < tolerance


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_centre_crop_keeps_the_middle(tmp_path, loader):
    # 48x16: left third red, middle third green, right third blue. The centre square
    # (16x16) is the green third, so every output pixel is green.
    pixels = np.zeros((16, 48, 3), np.uint8)
    pixels[:, :16, 0] = pixels[:, 16:32, 1] = pixels[:, 32:, 2] = 255
    path = tmp_path / "thirds.png"
    Image.fromarray(pixels).save(path)
    config = _config(loader)
    (batch,) = iter_eval_images([str(path)], config, batch_size=4)
    image = batch.images[0].cpu().numpy()
    mean, std = np.array(config.data.mean), np.array(config.data.std)
    green = (np.array([0, 1, 0]) - mean) / std
    # Resampling blurs a pixel or two at the borders; the inner part is exact.
    assert np.allclose(image[:, 2:-2, 2:-2], green[:, None, None], atol=0.05)


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_missing_and_corrupt_files_are_reported_not_raised(tmp_path, loader, caplog):
    good = _write(tmp_path / "good.jpg", 20, 20)
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    paths = [
        good,
        str(tmp_path / "missing.jpg"),
        str(tmp_path / "cut.jpg"),
        good,
        str(tmp_path / "noise.jpg"),
    ]
    batches = list(iter_eval_images(paths, _config(loader), batch_size=2))
    indices = [int(i) for b in batches for i in b.indices]
    failed = [i for b in batches for i in b.failed]
    assert indices == [0, 3] and sorted(failed) == [1, 2, 4]
    # The last batch held only a bad file: it still comes, empty, with its failure.
    assert batches[-1].images.shape[0] == 0 and batches[-1].failed == [4]
    assert "missing.jpg" in caplog.text and "noise.jpg" in caplog.text


def test_dali_backend_survives_a_decoder_error():
    # A DALI pipeline is unusable after a decoding error; the backend rebuilds it, finds the
    # bad image by decoding one at a time, and returns the others.
    from megatron_ibxl.data.backends import DaliImages

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 10)).save(buffer, "JPEG")
    good = buffer.getvalue()
    noise = np.random.default_rng(1).bytes(300)
    backend = DaliImages("eval", _config("dali"), max_batch=4, seed=0)
    decoded = backend([good, noise, good])
    assert decoded.ok == [0, 2] and decoded.failed == [1]
    assert decoded.images.shape == (2, 3, SIZE, SIZE)
    assert backend([good]).ok == [0]
