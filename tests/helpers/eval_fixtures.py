"""Evaluation fixtures: a stand-in model whose right answers are known, and small data trees
in the real on-disk formats (ImageFolder with ImageNet wnids, Karpathy, captions_val2017).

The stand-in's image embedding is the one-hot of the palette colour nearest to the image's
mean colour, read back after the real pipeline decoded, centre-cropped, resized and
normalised it; every image is one solid colour, so that survives JPEG and resizing. Its
text embedding is the vector given for the first phrase found in the text (a one-hot
colour, or a mixture), and the one-hot of an extra "other" dimension when none is found.
The tests compute the expected metrics by hand from these rules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from megatron_ibxl.config import RunConfig
from megatron_ibxl.evaluation import EvalTowers

PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOURS = list(PALETTE)
DIM = len(COLOURS) + 1
"""Embedding width: one dimension per colour, and "other" last."""
OTHER = len(COLOURS)


def colour_vector(**weights: float) -> list[float]:
    """A text vector from colour weights, e.g. colour_vector(red=0.6, green=0.8)."""
    vector = [0.0] * DIM
    for name, weight in weights.items():
        vector[OTHER if name == "other" else COLOURS.index(name)] = weight
    return vector


def eval_config(loader: str = "auto", image_size: int = 32, batch_size: int = 3) -> RunConfig:
    """A run config for evaluation images: small side, DALI (auto) or the PIL fallback."""
    config = RunConfig()
    config.model.vision.image_size = image_size
    config.data.loader = loader
    config.data.num_threads = 1
    config.eval.batch_size = batch_size
    return config


class StandIn:
    """The stand-in model. `calls` counts tower calls, to check ranks make the same number."""

    def __init__(self, config: RunConfig, phrases: dict[str, list[float]] | None = None):
        self.config = config
        self.mean = torch.tensor(config.data.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(config.data.std).view(1, 3, 1, 1)
        self.palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32)  # [8, 3]
        phrases = phrases or {name: colour_vector(**{name: 1.0}) for name in COLOURS}
        self.phrases = [
            (re.compile(rf"\b{re.escape(p)}\b", re.IGNORECASE), torch.tensor(v))
            for p, v in phrases.items()
        ]
        self.calls = {"image": 0, "text": 0}

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self.calls["image"] += 1
        pixels = (images.cpu() * self.std + self.mean) * 255.0  # undo the normalisation
        colour = pixels.mean(dim=(2, 3))  # [n, 3]
        nearest = torch.cdist(colour, self.palette).argmin(dim=1)  # [n]
        return F.one_hot(nearest, DIM).float()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        self.calls["text"] += 1
        rows = []
        for text in texts:
            vector = torch.tensor(colour_vector(other=1.0))
            for pattern, value in self.phrases:
                if pattern.search(text):
                    vector = value
                    break
            rows.append(F.normalize(vector, dim=0))
        return torch.stack(rows)

    def towers(self) -> EvalTowers:
        """EvalTowers reading images through the real evaluation pipeline."""
        from megatron_ibxl.data.eval_images import iter_eval_images

        vision = self.config.model.vision
        return EvalTowers(
            encode_images=self.encode_images,
            encode_texts=self.encode_texts,
            read_images=lambda paths, size: iter_eval_images(paths, self.config, size),
            image_shape=(vision.channels, vision.image_size, vision.image_size),
        )


def write_image(path: Path, colour: str, size: tuple[int, int] = (48, 40)) -> None:
    """A solid image of a palette colour (not square, so the centre crop matters)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, PALETTE[colour])
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, format="JPEG", quality=95)
    else:
        image.save(path)


# The ImageNet tree: wnid -> colours of its images. The class names (from the packaged list)
# are given text vectors in IMAGENET_PHRASES; every other of the 1,000 classes is "other".
IMAGENET_TREE = {
    "n01440764": ["red", "red", "green"],  # tench
    "n01443537": ["green", "red"],  # goldfish
    "n01484850": ["green"],  # great white shark
    "n01491361": ["blue", "yellow"],  # tiger shark
    "n01494475": ["yellow"],  # hammerhead shark, plus one corrupt file
}
IMAGENET_PHRASES = {
    "tench": colour_vector(red=1.0),
    "goldfish": colour_vector(red=0.6, green=0.8),
    "great white shark": colour_vector(green=1.0),
    "tiger shark": colour_vector(blue=1.0),
    "hammerhead shark": colour_vector(yellow=1.0),
}


def make_imagenet_tree(root: Path) -> Path:
    """DATA/val/<wnid>/*.JPEG per IMAGENET_TREE, a corrupt JPEG, a folder whose name is not
    a wnid of the list (2 images), and a text file that is not an image."""
    val = root / "val"
    for wnid, colours in IMAGENET_TREE.items():
        for i, colour in enumerate(colours):
            write_image(val / wnid / f"ILSVRC2012_val_{wnid}_{i}.JPEG", colour)
    (val / "n01494475" / "ILSVRC2012_val_broken.JPEG").write_bytes(b"\xff\xd8\xff" + b"x" * 64)
    (val / "n01440764" / "notes.txt").write_text("not an image")
    write_image(val / "n99999999" / "a.JPEG", "red")
    write_image(val / "n99999999" / "b.JPEG", "blue")
    return root


def make_karpathy(root: Path) -> Path:
    """DATA/dataset_coco.json (Karpathy layout) with images under DATA/val2014/."""
    images = [
        ("A", "red", "test", ["a red box", "red", "something red", "a red patch",
                              "red paint on a wall", "red six"]),
        ("B", "green", "test", ["green", "a green field", "green grass", "a blue sky", "plain"]),
        ("C", "blue", "test", ["blue", "a blue sea", "blue water"]),
        ("D", "red", "test", ["a red car", "a yellow cab", "yellow", "yellow light",
                              "a yellow sign"]),
        ("E", None, "test", ["yellow"] * 5),  # listed, but its file is missing
        ("F", "green", "train", ["green"] * 5),  # another split: not evaluated
        ("G", "blue", "test", []),  # no captions
    ]  # fmt: skip
    return write_karpathy(root, images)


def write_karpathy(root: Path, images: list[tuple[str, str | None, str, list[str]]]) -> Path:
    """DATA/dataset_coco.json (Karpathy layout) listing `images`, each (key, colour, split,
    captions), with its file under DATA/val2014/: a solid image of the colour, no file when
    the colour is None, bytes that do not decode when it is "corrupt"."""
    entries = []
    for number, (key, colour, split, sentences) in enumerate(images):
        name = f"COCO_val2014_{number:012d}.jpg"
        if colour == "corrupt":
            (root / "val2014").mkdir(parents=True, exist_ok=True)
            (root / "val2014" / name).write_bytes(b"\xff\xd8\xff" + b"x" * 64)
        elif colour is not None:
            write_image(root / "val2014" / name, colour)
        entries.append(
            {
                "filepath": "val2014",
                "filename": name,
                "imgid": number,
                "split": split,
                "sentences": [{"raw": s, "tokens": s.split()} for s in sentences],
                "cocoid": 1000 + number,
                "key": key,
            }
        )
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return root


COCO_IMAGES = {
    11: ("red", ["a red kite", "red", "red red", "the red one", "red", "red extra six",
                 "red extra seven"]),
    12: ("green", ["green", "green", "a dog", "green", "green"]),
    13: ("blue", ["blue", "blue", "blue"]),
    14: ("yellow", ["yellow", "yellow", "yellow", "yellow", "a red hat"]),
    15: ("cyan", ["cyan"] * 5),
    16: ("magenta", ["magenta", "magenta", "magenta", "magenta", "a green cat"]),
    17: ("red", ["red"] * 5),
    18: (None, ["white"] * 5),  # listed, but its file is missing
    19: ("blue", []),  # no captions
}  # fmt: skip


def make_coco2017(root: Path) -> Path:
    """DATA/annotations/captions_val2017.json (COCO layout) with images under DATA/val2017/.

    Annotations are interleaved across images (as in the real file), each image's own in
    order, plus one caption whose image_id is not listed."""
    images, per_image = [], []
    for image_id, (colour, captions) in COCO_IMAGES.items():
        name = f"{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": name, "height": 40, "width": 48})
        if colour is not None:
            write_image(root / "val2017" / name, colour)
        per_image.append([(image_id, c) for c in captions])
    annotations = []
    for round_ in range(max(len(c) for c in per_image)):
        for captions in per_image:
            if round_ < len(captions):
                image_id, caption = captions[round_]
                annotations.append(
                    {"image_id": image_id, "id": len(annotations), "caption": caption}
                )
    annotations.insert(7, {"image_id": 99, "id": 999, "caption": "an orphan caption"})
    folder = root / "annotations"
    folder.mkdir(parents=True, exist_ok=True)
    content = {"info": {}, "images": images, "annotations": annotations}
    (folder / "captions_val2017.json").write_text(json.dumps(content))
    return root
