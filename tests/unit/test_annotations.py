"""COCO files and label-map folders: instances, label maps, and bad annotations named by field.

The COCO file is generated here: polygons, uncompressed and compressed RLE (pycocotools encodes
the compressed one), a crowd region, keypoints with flip pairs, an image without annotations,
and one bad annotation of each kind.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from augserve.core.targets import MASK_FILL
from augserve.data.annotations import load_coco, read_label_map, scan_label_maps
from helpers import uncompressed_rle

HEIGHT, WIDTH = 40, 60
KEYPOINT_NAMES = ["nose", "left_eye", "right_eye", "left_hand", "right_hand"]


def rectangle_mask(top: int, left: int, height: int, width: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[top : top + height, left : left + width] = 1
    return mask


def write_coco(path) -> None:
    compressed = coco_mask.encode(np.asfortranarray(rectangle_mask(20, 30, 10, 20)))
    crowd = coco_mask.encode(np.asfortranarray(rectangle_mask(0, 50, 5, 10)))
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "height": HEIGHT, "width": WIDTH},
            {"id": 2, "file_name": "b.jpg", "height": HEIGHT, "width": WIDTH},  # no annotations
        ],
        "categories": [
            {"id": 7, "name": "cat"},
            {"id": 3, "name": "person", "keypoints": KEYPOINT_NAMES},
        ],
        "annotations": [
            # a polygon (a 10 x 8 rectangle at x 5, y 4), a person with keypoints
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [5, 4, 10, 8], "iscrowd": 0,
             "segmentation": [[5, 4, 15, 4, 15, 12, 5, 12]],
             "keypoints": [6, 5, 2, 7, 5, 2, 9, 5, 1, 5, 10, 2, 0, 0, 0]},
            # uncompressed RLE, a cat
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [40, 2, 8, 6], "iscrowd": 0,
             "segmentation": uncompressed_rle(rectangle_mask(2, 40, 6, 8))},
            # compressed RLE
            {"id": 12, "image_id": 1, "category_id": 7, "bbox": [30, 20, 20, 10], "iscrowd": 0,
             "segmentation": {"size": [HEIGHT, WIDTH], "counts": compressed["counts"].decode()}},
            # a crowd region: no box, ignore in the mask
            {"id": 13, "image_id": 1, "category_id": 3, "bbox": [50, 0, 10, 5], "iscrowd": 1,
             "segmentation": {"size": [HEIGHT, WIDTH], "counts": crowd["counts"].decode()}},
            # bad ones, each left out with its field named
            {"id": 14, "image_id": 99, "category_id": 7, "bbox": [0, 0, 1, 1]},
            {"id": 15, "image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]},
            {"id": 16, "image_id": 1, "category_id": 7, "bbox": [50, 30, 20, 20]},
            {"id": 17, "image_id": 1, "category_id": 7, "bbox": [1, 1, 2, 2],
             "segmentation": {"size": [HEIGHT + 1, WIDTH], "counts": [0, 5]}},
            {"id": 18, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2], "keypoints": [1, 2, 3]},
            {"id": 19, "image_id": 1, "category_id": 7, "bbox": [1, 1, "wide", 2]},
        ],
    }
    path.write_text(json.dumps(data))


@pytest.fixture()
def coco(tmp_path):
    path = tmp_path / "instances.json"
    write_coco(path)
    return load_coco(path)


def test_instances_come_as_boxes_labels_and_keypoints(coco):
    assert coco.categories == ("person", "cat")  # in id order: 3, then 7
    assert coco.flip_pairs == ((1, 2), (3, 4))
    targets = coco.targets(1)
    # 10, 11, 12, and 17 (its segmentation is left out, its box kept); 18 keeps its box
    # without keypoints.
    assert targets.labels.tolist() == [0, 1, 1, 1, 0]
    np.testing.assert_array_equal(targets.boxes[:3], [[5, 4, 15, 12], [40, 2, 48, 8], [30, 20, 50, 30]])
    assert targets.keypoints.shape == (5, 5, 3)
    np.testing.assert_array_equal(targets.keypoints[0, 1], [7, 5, 2])
    assert len(coco.targets(2)) == 0 and coco.targets(2).keypoints.shape == (0, 5, 3)


def test_the_label_map_has_every_kind_of_segmentation_and_crowd_as_ignore(coco):
    mask = coco.mask(1)
    assert mask.shape == (HEIGHT, WIDTH)
    assert (mask[4:12, 5:15] == 1).all()  # the polygon: person (label 0) + 1
    assert (mask[2:8, 40:48] == 2).all()  # uncompressed RLE: cat
    assert (mask[20:30, 30:50] == 2).all()  # compressed RLE
    assert (mask[0:5, 50:60] == MASK_FILL).all()  # crowd
    assert int((mask == 0).sum()) == HEIGHT * WIDTH - 80 - 48 - 200 - 50  # nothing else is labelled
    assert (coco.mask(2) == 0).all()


def test_bad_annotations_are_named_by_file_and_field_and_left_out(coco):
    problems = {problem.field: problem.reason for problem in coco.problems}
    assert all(problem.file == "instances.json" for problem in coco.problems)
    assert "unknown image id 99" in problems["annotations[4].image_id"]
    assert "unknown category id 5" in problems["annotations[5].category_id"]
    assert "outside the 60x40 image" in problems["annotations[6].bbox"]
    assert "RLE size" in problems["annotations[7].segmentation"]
    assert "expected 15 numbers" in problems["annotations[8].keypoints"]
    assert "finite numbers" in problems["annotations[9].bbox"]
    assert len(coco.problems) == 6


def test_an_unreadable_file_is_one_clear_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: cannot read a COCO file"):
        load_coco(path)


def test_label_map_folders_pair_images_with_masks_and_check_sizes(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (WIDTH, HEIGHT)).save(tmp_path / "images" / f"{name}.jpg")
    Image.fromarray(np.full((HEIGHT, WIDTH), 3, np.uint8)).save(tmp_path / "masks" / "a.png")
    Image.fromarray(np.zeros((HEIGHT, WIDTH + 1), np.uint8)).save(tmp_path / "masks" / "b.png")
    Image.fromarray(np.zeros((HEIGHT, WIDTH), np.uint8)).save(tmp_path / "masks" / "orphan.png")
    pairs, problems = scan_label_maps(tmp_path)
    assert [pair.image for pair in pairs] == ["images/a.jpg", "images/b.jpg"]
    assert {(problem.file, problem.field) for problem in problems} == {("images/c.jpg", "mask"), ("masks/orphan.png", "image")}
    assert (read_label_map(tmp_path / pairs[0].mask, (HEIGHT, WIDTH)) == 3).all()
    with pytest.raises(ValueError, match="mask is 61x40, its image 60x40"):
        read_label_map(tmp_path / pairs[1].mask, (HEIGHT, WIDTH))
    Image.new("RGB", (WIDTH, HEIGHT)).save(tmp_path / "masks" / "rgb.png")
    with pytest.raises(ValueError, match="single-channel or palette"):
        read_label_map(tmp_path / "masks" / "rgb.png", (HEIGHT, WIDTH))


def test_the_demo_scenes_agree_between_pictures_label_maps_and_their_coco_file(tmp_path):
    from augserve.data.demo_scenes import SCENE_CLASSES, SceneConfig, ensure_demo_scenes

    root = ensure_demo_scenes(SceneConfig(images=12, image_size=48), root=tmp_path)
    assert ensure_demo_scenes(SceneConfig(images=12, image_size=48), root=tmp_path) == root  # cached
    coco = load_coco(root / "instances.json")
    assert coco.problems == [] and coco.categories == SCENE_CLASSES
    pairs, problems = scan_label_maps(root)
    assert len(pairs) == 12 and problems == []
    for image, pair in zip(coco.images, pairs):
        assert image.file_name == pair.image
        label_map = read_label_map(root / pair.mask, image.size)
        # The COCO polygons rasterised by pycocotools and the label map drawn by PIL agree
        # but for pixels on polygon edges, where the two rasterisers round differently.
        assert np.mean(coco.mask(image.image_id) != label_map) < 0.05
        assert 1 <= len(coco.targets(image.image_id)) <= 3
