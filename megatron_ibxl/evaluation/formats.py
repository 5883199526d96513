"""Evaluation data on disk: class lists, prompt templates, ImageFolder trees, COCO captions.

Three layouts are read, each as it is commonly distributed:

- ImageFolder (zero-shot classification): `DATA/val/<folder>/*.JPEG` or
  `DATA/<folder>/*.JPEG`, one folder per class. For ImageNet-1K the folders are the
  ILSVRC-2012 wnids (`n01440764`, ...), named by the class list shipped in `data/`.
- Karpathy split (retrieval): `dataset_coco.json` with
  `{"images": [{"filepath", "filename", "split", "sentences": [{"raw"}, ...]}]}`; the
  `test` split is the usual 5,000-image COCO retrieval test set.
- COCO annotations (retrieval): `annotations/captions_val2017.json` with `images`
  (`id`, `file_name`) and `annotations` (`image_id`, `caption`), images under `val2017/`.

Nothing here raises for a single bad item: images whose file is missing, class folders not
in the class list and captions that name no image are counted, and the counts are reported
with the metrics. A data folder in none of the layouts, or an unreadable annotation or class
file, is a DataError with one line that says what was expected.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from megatron_ibxl.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
"""File endings (any case) taken as images in an ImageFolder tree; other files are ignored."""

CAPTIONS_PER_IMAGE = 5
"""Captions kept per image for retrieval (COCO has 5, a few images 6 or 7)."""

_KARPATHY_FILE = "dataset_coco.json"
_COCO_FILE = "captions_val2017.json"


# ---------------------------------------------------------------------------------------
# Class lists and templates
# ---------------------------------------------------------------------------------------


def _packaged(name: str) -> tuple[str, str]:
    """(text, a name for messages) of a data file shipped in megatron_ibxl/evaluation/data."""
    resource = resources.files("megatron_ibxl.evaluation").joinpath("data", name)
    return resource.read_text(encoding="utf-8"), f"packaged {name}"


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found; pass an existing file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the {what} ({exc}); pass a UTF-8 text file") from None


def read_class_names(path: str | None = None) -> list[tuple[str, str]]:
    """(folder, class name) pairs in class-index order.

    Args:
        path: a file with one `folder<TAB>class name` per line (blank lines and lines
            starting with `#` are skipped); None reads the packaged ImageNet-1K list, whose
            folders are the 1,000 ILSVRC-2012 wnids in sorted order.

    Raises DataError naming the file and line of a malformed line or a repeated folder.
    """
    text, source = (
        _packaged("imagenet_classes.tsv")
        if path is None
        else (
            _read_text(path, "class list"),
            path,
        )
    )
    pairs: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        folder, tab, name = line.partition("\t")
        if not tab or not folder.strip() or not name.strip():
            raise DataError(
                f"{source}:{number}: {line.strip()!r} is not 'folder<TAB>class name'; "
                "write one class a line, the folder name and the class name separated by a tab"
            )
        folder = folder.strip()
        if folder in seen:
            raise DataError(
                f"{source}:{number}: folder {folder!r} is listed again (first at line "
                f"{seen[folder]}); list each class folder once"
            )
        seen[folder] = number
        pairs.append((folder, name.strip()))
    if not pairs:
        raise DataError(f"{source}: the class list is empty; write one 'folder<TAB>name' a line")
    return pairs


def read_templates(path: str | None = None) -> list[str]:
    """Prompt templates, one a line with `{}` where the class name goes.

    Args:
        path: a template file; None reads the packaged ImageNet templates.

    Raises DataError for a line without `{}` (naming file and line) or an empty file.
    """
    text, source = (
        _packaged("templates.txt")
        if path is None
        else (
            _read_text(path, "template file"),
            path,
        )
    )
    templates = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{}" not in line:
            raise DataError(
                f"{source}:{number}: template {line!r} has no '{{}}'; mark where the class "
                "name goes with {}"
            )
        templates.append(line)
    if not templates:
        raise DataError(f"{source}: no templates; write one a line, e.g. 'a picture of a {{}}.'")
    return templates


def fill_template(template: str, class_name: str) -> str:
    """The prompt for one class: every `{}` replaced by the name (other braces untouched)."""
    return template.replace("{}", class_name)


# ---------------------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------------------


@dataclass
class ClassificationSet:
    """The images of an ImageFolder tree whose folder is in the class list."""

    root: str
    """The folder holding the class folders (`DATA/val` or `DATA`)."""
    class_names: list[str]
    """Every class of the classifier, in class-index order (classes without images too)."""
    paths: list[str]
    """Image files, sorted by class folder then by path."""
    labels: list[int]
    """Class index of each entry of `paths`."""
    unknown_folders: list[str] = field(default_factory=list)
    """Sub-folders of `root` that are not in the class list (skipped)."""
    images_in_unknown_folders: int = 0
    """Image files inside `unknown_folders` (not evaluated)."""


def _image_files(folder: str) -> list[str]:
    """Image files under `folder`, recursively, sorted for a stable order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.join(dirpath, name))
    return sorted(found)


def _image_folder_root(data: str) -> tuple[str, list[str]]:
    """The folder holding the class folders, and their names; DataError if there is none."""
    expected = "expected an ImageFolder tree: DATA/val/<class folder>/*.JPEG or DATA/<class>/*"
    if not os.path.isdir(data):
        raise DataError(f"{data}: not a folder; {expected}")
    root = os.path.join(data, "val") if os.path.isdir(os.path.join(data, "val")) else data
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    folders = [e.name for e in entries if e.is_dir()]
    if folders:
        return root, folders
    loose = [e.name for e in entries if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]
    if loose:
        raise DataError(
            f"{root}: {len(loose)} images lie directly in the folder with no class folders; "
            f"{expected} (sort the validation images into one folder per class)"
        )
    raise DataError(f"{root}: no class folders; {expected}")


def scan_image_folder(data: str, classes: list[tuple[str, str]], source: str) -> ClassificationSet:
    """List the images of an ImageFolder tree by class.

    Args:
        data: `DATA` with `DATA/val/<folder>/` or `DATA/<folder>/` class folders.
        classes: (folder, class name) pairs from `read_class_names`.
        source: where the class list came from, for the error message.

    Raises DataError when `data` has no class folders, or when none of its folders is in
    the class list (the usual cause: a dataset other than ImageNet without `--classes`).
    """
    root, folders = _image_folder_root(data)
    index = {folder: i for i, (folder, _) in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    unknown: list[str] = []
    unknown_images = 0
    for folder in folders:
        files = _image_files(os.path.join(root, folder))
        if folder not in index:
            unknown.append(folder)
            unknown_images += len(files)
            continue
        paths.extend(files)
        labels.extend([index[folder]] * len(files))

    if not paths:
        shown = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
        raise DataError(
            f"{root}: no images in folders named by the class list ({source}); found folders "
            f"{shown}; pass --classes FILE with one 'folder<TAB>class name' a line"
        )
    if unknown:
        logger.info(
            "%d class folders of %s are not in the class list and are skipped: %s",
            len(unknown),
            root,
            ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else ""),
        )
    names = [name for _, name in classes]
    return ClassificationSet(root, names, paths, labels, unknown, unknown_images)


# ---------------------------------------------------------------------------------------
# COCO retrieval
# ---------------------------------------------------------------------------------------


@dataclass
class RetrievalSet:
    """Images and their captions for image-text retrieval.

    Every image has at least one caption and at most `CAPTIONS_PER_IMAGE`; every caption
    belongs to exactly one image.
    """

    annotation_file: str
    """The file the captions were read from."""
    layout: Literal["karpathy", "coco"]
    """`karpathy` (dataset_coco.json, test split) or `coco` (captions_*.json)."""
    image_paths: list[str]
    """Image files that exist, in the annotation file's order."""
    captions: list[str]
    """Captions of those images, grouped by image."""
    caption_image: list[int]
    """For each caption, the index of its image in `image_paths`."""
    counts: dict[str, int]
    """What was skipped and why, as far as the annotation file and the file system tell:
    images_listed, images_missing, images_without_captions, captions_without_image,
    captions_of_missing_images, and (over every image found, as if all of them decode)
    images_with_fewer_than_5_captions, captions_ignored_beyond_5. `evaluated_counts` gives
    the final counts once it is known which images decode."""
    captions_listed: list[int] = field(default_factory=list)
    """For each image in `image_paths`, the captions the file lists for it (before the cap)."""
    captions_per_image: int = CAPTIONS_PER_IMAGE
    """The cap on captions kept per image."""

    def evaluated_counts(self, decoded: list[bool]) -> dict[str, int]:
        """`counts` over the images that are evaluated, given `decoded[i]`: whether image i
        of `image_paths` decodes. An image that does not decode is dropped with all its
        captions (images_unreadable, captions_of_unreadable_images), so it is not among the
        images_with_fewer_than_N_captions and its captions are not among
        captions_ignored_beyond_N. The captions of the listed images then add up:
        kept + ignored beyond N + of missing images + of unreadable images."""
        limit = self.captions_per_image
        evaluated = [n for n, ok in zip(self.captions_listed, decoded, strict=True) if ok]
        dropped = [n for n, ok in zip(self.captions_listed, decoded, strict=True) if not ok]
        return {
            **self.counts,
            f"images_with_fewer_than_{limit}_captions": sum(n < limit for n in evaluated),
            f"captions_ignored_beyond_{limit}": sum(max(n - limit, 0) for n in evaluated),
            "images_unreadable": len(dropped),
            "captions_of_unreadable_images": sum(dropped),
        }


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "pass an unmodified dataset_coco.json or captions_val2017.json"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _find_annotation_file(data: str) -> tuple[Path, Path]:
    """(annotation file, base folder that image paths are relative to)."""
    given = Path(data)
    if given.is_file():
        base = given.parent.parent if given.parent.name == "annotations" else given.parent
        return given, base
    for name in (_KARPATHY_FILE, _COCO_FILE):
        for candidate in (given / name, given / "annotations" / name):
            if candidate.is_file():
                return candidate, given
    raise DataError(
        f"{data}: expected a COCO folder with {_KARPATHY_FILE} (Karpathy split) or "
        f"annotations/{_COCO_FILE} plus val2017/, or the path of one of those JSON files"
    )


def _locate(base: Path, candidates: list[str]) -> str | None:
    """The first candidate path under `base` that is a file, or None."""
    for relative in candidates:
        path = base / relative
        if path.is_file():
            return str(path)
    return None


def load_retrieval_set(data: str, captions_per_image: int = CAPTIONS_PER_IMAGE) -> RetrievalSet:
    """Read COCO captions in the Karpathy or the COCO annotation format.

    Args:
        data: a folder holding `dataset_coco.json` or `annotations/captions_val2017.json`
            (the Karpathy file wins when both are there), or the path of such a file.
        captions_per_image: captions kept per image, in file order.

    Images whose file is missing are left out with all their captions, images without any
    caption are left out, and captions whose image id is not listed are ignored; each is
    counted in `counts`. Images with fewer than `captions_per_image` captions are kept.
    Raises DataError when no layout is recognised or no image is left.
    """
    path, base = _find_annotation_file(data)
    content = _load_json(path)
    if isinstance(content, dict) and "annotations" in content and "images" in content:
        layout, (entries, orphans) = "coco", _coco_entries(content, path)
    elif isinstance(content, dict) and isinstance(content.get("images"), list):
        layout, (entries, orphans) = "karpathy", _karpathy_entries(content, path)
    else:
        raise DataError(
            f"{path}: neither the Karpathy layout ({{'images': [{{'filename', 'split', "
            "'sentences'}]}) nor the COCO layout ({'images', 'annotations'})"
        )
    result = _assemble(path, base, layout, entries, orphans, captions_per_image)
    if not result.image_paths:
        raise DataError(
            f"{path}: none of the {result.counts['images_listed']} listed images was found "
            f"under {base}; put the image folder (val2014/ or val2017/) next to the annotations"
        )
    return result


@dataclass
class _Entry:
    candidates: list[str]
    captions: list[str]


def _karpathy_entries(content: dict, path: Path) -> tuple[list[_Entry], int]:
    """Test-split images of a Karpathy file with their image path candidates, and 0 captions
    without an image (every sentence sits inside its image)."""
    entries = []
    for number, image in enumerate(content["images"]):
        if not isinstance(image, dict) or "filename" not in image or "sentences" not in image:
            raise DataError(
                f"{path}: images[{number}] lacks 'filename' or 'sentences'; expected the "
                "Karpathy layout (dataset_coco.json)"
            )
        if image.get("split") != "test":
            continue
        name, sub = image["filename"], image.get("filepath", "")
        candidates = [f"{sub}/{name}", f"images/{sub}/{name}"] if sub else []
        candidates += [name, f"images/{name}"]
        captions = [_sentence_text(s) for s in image["sentences"]]
        entries.append(_Entry(candidates, captions))
    if not entries:
        raise DataError(f"{path}: no image has split 'test'; expected the Karpathy test split")
    return entries, 0


def _sentence_text(sentence: Any) -> str:
    if isinstance(sentence, dict):
        if "raw" in sentence:
            return str(sentence["raw"]).strip()
        return " ".join(sentence.get("tokens", []))
    return str(sentence).strip()


def _coco_entries(content: dict, path: Path) -> tuple[list[_Entry], int]:
    """Images of a COCO captions file with their captions in annotation order, and the
    number of captions whose image_id is not among the images. Images are looked for in
    the folder named by the file (`captions_val2017.json`: `val2017/`), then at the base."""
    folder = path.stem.removeprefix("captions_")
    by_id: dict[Any, _Entry] = {}
    for number, image in enumerate(content["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DataError(f"{path}: images[{number}] lacks 'id' or 'file_name' (COCO layout)")
        name = image["file_name"]
        candidates = [f"{folder}/{name}", f"images/{folder}/{name}", name, f"images/{name}"]
        by_id[image["id"]] = _Entry(candidates, [])
    orphans = 0
    for number, note in enumerate(content["annotations"]):
        if not isinstance(note, dict) or "image_id" not in note or "caption" not in note:
            raise DataError(
                f"{path}: annotations[{number}] lacks 'image_id' or 'caption' (COCO layout)"
            )
        entry = by_id.get(note["image_id"])
        if entry is None:
            orphans += 1
        else:
            entry.captions.append(str(note["caption"]).strip())
    return list(by_id.values()), orphans


def _assemble(
    path: Path, base: Path, layout: str, entries: list[_Entry], orphans: int, limit: int
) -> RetrievalSet:
    """Resolve image files, cap captions, and count everything that is left out."""
    counts = {
        "images_listed": len(entries),
        "images_missing": 0,
        "images_without_captions": 0,
        f"images_with_fewer_than_{limit}_captions": 0,
        f"captions_ignored_beyond_{limit}": 0,
        "captions_without_image": orphans,
        "captions_of_missing_images": 0,
    }
    image_paths: list[str] = []
    captions: list[str] = []
    caption_image: list[int] = []
    captions_listed: list[int] = []
    for entry in entries:
        kept = entry.captions[:limit]
        if not kept:
            counts["images_without_captions"] += 1
            continue
        found = _locate(base, entry.candidates)
        if found is None:
            counts["images_missing"] += 1
            counts["captions_of_missing_images"] += len(entry.captions)
            continue
        counts[f"captions_ignored_beyond_{limit}"] += len(entry.captions) - len(kept)
        counts[f"images_with_fewer_than_{limit}_captions"] += len(kept) < limit
        captions.extend(kept)
        caption_image.extend([len(image_paths)] * len(kept))
        image_paths.append(found)
        captions_listed.append(len(entry.captions))
    return RetrievalSet(
        str(path), layout, image_paths, captions, caption_image, counts, captions_listed, limit
    )
