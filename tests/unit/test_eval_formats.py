"""Evaluation data formats: the packaged class list and templates, ImageFolder trees, the
Karpathy and COCO caption files, and the one-line errors for data in no known layout."""

import json

import pytest

from megatron_ibxl.errors import DataError
from megatron_ibxl.evaluation.formats import (
    load_retrieval_set,
    read_class_names,
    read_templates,
    scan_image_folder,
)
from tests.helpers.eval_fixtures import (
    IMAGENET_TREE,
    make_coco2017,
    make_imagenet_tree,
    make_karpathy,
    write_image,
)


def test_packaged_imagenet_classes():
    classes = read_class_names()
    wnids = [folder for folder, _ in classes]
    names = [name for _, name in classes]
    assert len(classes) == 1000
    # Class index is sorted wnid order (the ILSVRC-2012 convention).
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    # Distinct names, so no two classes share a prompt.
    assert len(set(names)) == 1000
    # Well-known anchors of the standard index order.
    assert classes[0] == ("n01440764", "tench")
    assert classes[1] == ("n01443537", "goldfish")
    assert classes[207][0] == "n02099601"  # golden retriever
    assert classes[999][0] == "n15075141"  # toilet tissue


def test_packaged_templates():
    templates = read_templates()
    assert 10 <= len(templates) <= 20
    assert all("{}" in t for t in templates)
    assert len(set(templates)) == len(templates)


def test_class_file_and_template_file(tmp_path):
    classes = tmp_path / "classes.tsv"
    classes.write_text("# digits\n0\tzero\n1\tone\n\n")
    assert read_class_names(str(classes)) == [("0", "zero"), ("1", "one")]
    templates = tmp_path / "templates.txt"
    templates.write_text("a drawing of {}.\n\n{} again\n")
    assert read_templates(str(templates)) == ["a drawing of {}.", "{} again"]


@pytest.mark.parametrize(
    "text, match",
    [
        ("0 zero\n", r"classes.tsv:1: .* is not 'folder<TAB>class name'"),
        ("0\tzero\n0\tnought\n", r"classes.tsv:2: folder '0' is listed again"),
        ("# only a comment\n", r"class list is empty"),
    ],
)
def test_bad_class_file(tmp_path, text, match):
    path = tmp_path / "classes.tsv"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        read_class_names(str(path))


def test_bad_template_file(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a picture of {}\na picture\n")
    with pytest.raises(DataError, match=r"templates.txt:2: template 'a picture' has no '\{\}'"):
        read_templates(str(path))
    with pytest.raises(DataError, match="template file not found"):
        read_templates(str(tmp_path / "absent.txt"))


def test_scan_imagenet_tree(tmp_path):
    root = make_imagenet_tree(tmp_path)
    dataset = scan_image_folder(str(root), read_class_names(), "packaged")
    assert dataset.root == str(root / "val")
    # 9 solid images + 1 corrupt file (listed here, failed later by the decoder).
    assert len(dataset.paths) == sum(len(c) for c in IMAGENET_TREE.values()) + 1
    assert sorted(set(dataset.labels)) == [0, 1, 2, 3, 4]
    assert dataset.labels.count(0) == 3  # tench; notes.txt is not an image
    assert dataset.unknown_folders == ["n99999999"]
    assert dataset.images_in_unknown_folders == 2


def test_image_folder_without_val_subfolder(tmp_path):
    write_image(tmp_path / "3" / "a.jpg", "red")
    write_image(tmp_path / "3" / "nested" / "b.png", "red")
    dataset = scan_image_folder(str(tmp_path), [("3", "three")], "test")
    assert len(dataset.paths) == 2 and dataset.labels == [0, 0]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a folder; expected an ImageFolder tree"):
        scan_image_folder(str(tmp_path / "absent"), [("a", "a")], "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders; expected an ImageFolder tree"):
        scan_image_folder(str(tmp_path / "empty"), [("a", "a")], "test")
    write_image(tmp_path / "flat" / "x.JPEG", "red")
    with pytest.raises(DataError, match="lie directly in the folder with no class folders"):
        scan_image_folder(str(tmp_path / "flat"), [("a", "a")], "test")
    write_image(tmp_path / "digits" / "val" / "7" / "x.jpg", "red")
    with pytest.raises(DataError, match="no images in folders named by the class list.*--classes"):
        scan_image_folder(str(tmp_path / "digits"), read_class_names(), "packaged")


def test_karpathy_file(tmp_path):
    dataset = load_retrieval_set(str(make_karpathy(tmp_path)))
    assert dataset.layout == "karpathy"
    # Test split only: A, B, C, D kept; E missing; F is train; G has no sentences.
    assert len(dataset.image_paths) == 4
    assert dataset.captions[:5] == [
        "a red box",
        "red",
        "something red",
        "a red patch",
        "red paint on a wall",
    ]
    assert dataset.caption_image == [0] * 5 + [1] * 5 + [2] * 3 + [3] * 5
    assert dataset.counts == {
        "images_listed": 6,
        "images_missing": 1,
        "images_without_captions": 1,
        "images_with_fewer_than_5_captions": 1,
        "captions_ignored_beyond_5": 1,
        "captions_without_image": 0,
        "captions_of_missing_images": 5,
    }


def test_coco_annotation_file(tmp_path):
    root = make_coco2017(tmp_path)
    for given in (root, root / "annotations" / "captions_val2017.json"):
        dataset = load_retrieval_set(str(given))
        assert dataset.layout == "coco"
        assert len(dataset.image_paths) == 7
        assert dataset.image_paths[0].endswith("val2017/000000000011.jpg")
        # Image 11 has 7 captions interleaved with others in the file: the first 5 by
        # file order are kept, and they stay grouped under their image.
        assert dataset.captions[:5] == ["a red kite", "red", "red red", "the red one", "red"]
        assert len(dataset.captions) == 33
        assert dataset.counts["captions_without_image"] == 1
        assert dataset.counts["captions_ignored_beyond_5"] == 2
        assert dataset.counts["images_missing"] == 1
        assert dataset.counts["images_without_captions"] == 1


def test_retrieval_layout_errors(tmp_path):
    with pytest.raises(DataError, match="expected a COCO folder with dataset_coco.json"):
        load_retrieval_set(str(tmp_path))
    bad = tmp_path / "dataset_coco.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="dataset_coco.json: not valid JSON"):
        load_retrieval_set(str(tmp_path))
    bad.write_text(json.dumps({"categories": []}))
    with pytest.raises(DataError, match="neither the Karpathy layout"):
        load_retrieval_set(str(tmp_path))
    bad.write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "val"}]}))
    with pytest.raises(DataError, match=r"images\[0\] lacks 'filename' or 'sentences'"):
        load_retrieval_set(str(tmp_path))
    bad.write_text(json.dumps({"images": [{"filename": "x.jpg", "sentences": [], "split": "x"}]}))
    with pytest.raises(DataError, match="no image has split 'test'"):
        load_retrieval_set(str(tmp_path))
    entry = {"filename": "x.jpg", "split": "test", "sentences": [{"raw": "a"}]}
    bad.write_text(json.dumps({"images": [entry]}))
    with pytest.raises(DataError, match="none of the 1 listed images was found"):
        load_retrieval_set(str(tmp_path))
