"""Boxes, keypoints and masks through a real server: a COCO dataset generated here (polygons,
crowd and compressed RLE, keypoints with left/right pairs, an image without annotations, boxes
that rotate out of view, bad annotations), in-band and over shared memory, on the OpenCV and
DALI-CPU backends; and a label-map folder.

Each received sample's targets must equal its annotations mapped on the host by its own plan
(`make_plan` of (seed, epoch, sample id)) with the core functions that unit tests compare to
albumentations (tests/unit/test_targets.py): this checks that the producer, the wire and the
client carry them to the right image, whatever the backend and transport.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve._proto.augserve.v1 import augserve_pb2_grpc as pb_grpc
from augserve.backends.masks import warp_mask
from augserve.client import AugserveClientError, Client, Reconnect
from augserve.core.plan import make_plan
from augserve.core.spec import AugmentSpec
from augserve.core.targets import MASK_FILL, TargetRequest, transform_targets
from augserve.data.datasets import load_manifest
from augserve.rpc.convert import spec_to_proto
from augserve.rpc.server import DatasetConfig
from helpers import uncompressed_rle
from servers import running_server

KEYPOINT_NAMES = ["nose", "left_eye", "right_eye"]
SPEC = AugmentSpec.from_dict(
    {
        "ops": [
            {"rotate": {"degrees": 40}},
            {"zoom": {"range": [0.8, 1.3]}},
            {"flip": {"horizontal": 0.5}},
            {"random_resized_crop": {"size": [48, 56], "scale": [0.5, 1.0]}},
            {"brightness": {"factor": [0.7, 1.3]}},
            {"random_erasing": {"p": 0.5}},
        ],
        "fill_value": 0,
    }
)


def write_coco(root: Path) -> Path:
    """Ten pictures of 64x80 (and two of 72x72) with the annotation cases of the module doc."""
    (root / "pictures").mkdir(parents=True)
    rng = np.random.default_rng(7)
    images, annotations = [], []

    def annotate(image_id: int, category: int, bbox: list[float], **extra: object) -> None:
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category, "bbox": bbox, "iscrowd": 0, **extra})

    for index in range(12):
        height, width = (72, 72) if index >= 10 else (64, 80)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        name = f"pictures/p{index:02d}.png"
        Image.fromarray(pixels).save(root / name)
        image_id = 100 + index
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        if index == 5:
            continue  # an image without annotations
        x, y = float(rng.uniform(2, width / 2)), float(rng.uniform(2, height / 2))
        box_w, box_h = float(rng.uniform(8, width / 2 - 2)), float(rng.uniform(8, height / 2 - 2))
        polygon = [x, y, x + box_w, y, x + box_w, y + box_h, x, y + box_h]
        keypoints = [x + 2, y + 2, 2, x + 1, y + box_h - 1, 2, x + box_w - 1, y + box_h - 1, 1]
        annotate(image_id, 1, [x, y, box_w, box_h], segmentation=[polygon], keypoints=keypoints)
        # A small ball in the corner: rotated and zoomed, it often leaves the output.
        annotate(image_id, 2, [0.0, 0.0, 6.0, 6.0], segmentation=[[0, 0, 6, 0, 6, 6, 0, 6]])
        if index == 3:  # a crowd region as uncompressed RLE: ignore in the mask, no box
            region = np.zeros((height, width), np.uint8)
            region[40:60, 50:75] = 1
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 2, "iscrowd": 1,
                "bbox": [50, 40, 25, 20], "segmentation": uncompressed_rle(region),
            })
        if index == 4:  # a compressed RLE instance
            region = np.zeros((height, width), np.uint8, order="F")
            region[10:30, 20:44] = 1
            encoded = coco_mask.encode(region)
            encoded["counts"] = encoded["counts"].decode("ascii")
            annotate(image_id, 2, [20.0, 10.0, 24.0, 20.0], segmentation=encoded)
    # Bad annotations: left out and reported, never fatal.
    annotations.append({"id": 900, "image_id": 999, "category_id": 1, "bbox": [1, 1, 4, 4]})
    annotations.append({"id": 901, "image_id": 100, "category_id": 1, "bbox": [70, 50, 40, 40]})
    categories = [
        {"id": 1, "name": "face", "keypoints": KEYPOINT_NAMES},
        {"id": 2, "name": "ball"},
    ]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture(scope="module")
def coco_file(tmp_path_factory) -> Path:
    return write_coco(tmp_path_factory.mktemp("coco"))


def expected_targets(manifest, request: TargetRequest, sample_id: int, seed: int, epoch: int):
    """A sample's targets as the host maps them: its annotations through its own plan."""
    annotations = manifest.targets
    with Image.open(manifest.path(sample_id)) as image:
        size = (image.height, image.width)
    plan = make_plan(SPEC, seed, epoch, sample_id, size, 1)
    rules = request.rules(annotations.flip_pairs)
    return transform_targets(annotations.targets(sample_id), plan, rules), warp_mask(annotations.mask(sample_id), plan, rules)


def received(address: str, dataset: str, request: TargetRequest, transport: str, seed: int, epochs: int = 1) -> list:
    with Client(address, reconnect=Reconnect(attempts=0)) as client:
        stream = client.stream(dataset, spec=SPEC, batch_size=5, seed=seed, epochs=epochs, transport=transport, targets=request)
        with stream:
            batches = []
            for batch in stream:
                assert stream.facts.transport == transport
                batches.append({
                    "epoch": batch.epoch, "ids": batch.sample_ids.copy(), "images": batch.images.copy(),
                    "boxes": None if batch.boxes is None else [b.copy() for b in batch.boxes],
                    "labels": None if batch.box_labels is None else [b.copy() for b in batch.box_labels],
                    "keypoints": None if batch.keypoints is None else [k.copy() for k in batch.keypoints],
                    "masks": None if batch.masks is None else batch.masks.copy(),
                })
            return batches


REQUEST = TargetRequest(boxes=True, keypoints=True, masks=True, min_area=4.0, erase_marks_ignore=True)


@pytest.mark.parametrize("transport", ["inband", "shared_memory"])
def test_coco_targets_follow_every_sample_through_the_server(coco_file, transport):
    manifest = load_manifest(coco_file, use_cache=False)
    assert manifest.classes == ("face", "ball") and len(manifest) == 12
    problems = {(problem.field, problem.reason.split(" ")[0]) for problem in manifest.targets.problems}
    assert problems == {("annotations[24].image_id", "unknown"), ("annotations[25].bbox", "[70,")}
    # A COCO label map is drawn once and then served from the dataset's cache, read-only.
    first = manifest.targets.mask(0)
    assert manifest.targets.mask(0) is first and not first.flags.writeable and manifest.targets.mask_cache.stats().hits == 1
    with running_server({"coco": DatasetConfig(str(coco_file))}) as server:
        batches = received(f"127.0.0.1:{server.port}", "coco", REQUEST, transport, seed=3, epochs=2)
    seen, dropped, kept_boxes, ignored = set(), 0, 0, 0
    for batch in batches:
        for row, sample_id in enumerate(batch["ids"].tolist()):
            want, want_mask = expected_targets(manifest, REQUEST, sample_id, seed=3, epoch=batch["epoch"])
            np.testing.assert_array_equal(batch["boxes"][row], want.boxes)
            np.testing.assert_array_equal(batch["labels"][row], want.labels)
            np.testing.assert_array_equal(batch["keypoints"][row], want.keypoints)
            np.testing.assert_array_equal(batch["masks"][row], want_mask)
            assert batch["keypoints"][row].shape[1:] == (3, 3)
            seen.add(sample_id)
            dropped += len(manifest.targets.targets(sample_id)) - len(want)
            kept_boxes += len(want)
            ignored += int((want_mask == MASK_FILL).any())
    assert seen == set(range(12))
    assert dropped > 0 and kept_boxes > 0 and ignored > 0  # the cases happened: boxes left the view
    # The image without annotations has no boxes, and a mask of background and fill only.
    empty = next(b for b in batches if 5 in b["ids"].tolist())
    row = empty["ids"].tolist().index(5)
    assert len(empty["boxes"][row]) == 0 and set(np.unique(empty["masks"][row]).tolist()) <= {0, MASK_FILL}


def test_targets_agree_exactly_between_opencv_and_dali_cpu(coco_file):
    """The same sessions on both backends: targets and masks equal exactly (host maths and one
    mask warp), images within the backends' interpolation tolerance."""
    results = {}
    for backend in ("opencv", "dali-cpu"):
        with running_server({"coco": DatasetConfig(str(coco_file))}, backend=backend) as server:
            results[backend] = [received(f"127.0.0.1:{server.port}", "coco", REQUEST, "inband", seed=seed) for seed in (0, 1, 2)]
    for ours, theirs in zip(results["opencv"], results["dali-cpu"]):
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a["ids"], b["ids"])
            for name in ("boxes", "labels", "keypoints"):
                for x, y in zip(a[name], b[name]):
                    np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(a["masks"], b["masks"])
            difference = np.abs(a["images"].astype(int) - b["images"].astype(int))
            assert np.mean(difference) < 1.0


def test_a_label_map_folder_streams_masks_and_its_classes(tmp_path):
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    for index in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "images" / f"s{index}.png")
        labels = np.zeros((40, 50), np.uint8)
        labels[5:20, 10 + index : 30 + index] = 1 + index % 2
        Image.fromarray(labels).save(root / "masks" / f"s{index}.png")
    Image.fromarray(np.zeros((40, 51), np.uint8)).save(root / "masks" / "s9.png")  # no image: a problem
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / "images" / "s8.png")
    Image.fromarray(np.zeros((41, 50), np.uint8)).save(root / "masks" / "s8.png")  # wrong size: left out
    (root / "classes.txt").write_text("road\ncar\n")
    manifest = load_manifest(root, use_cache=False)
    assert len(manifest) == 6 and manifest.classes == ("road", "car")
    assert {problem.file for problem in manifest.targets.problems} == {"masks/s8.png", "masks/s9.png"}
    request = TargetRequest(masks=True)
    with running_server({"seg": DatasetConfig(str(root))}) as server:
        address = f"127.0.0.1:{server.port}"
        batches = received(address, "seg", request, "shared_memory", seed=5)
        with Client(address) as client, client.stream("seg", spec=SPEC, batch_size=6, epochs=1, targets=request) as stream:
            assert stream.facts.classes == ("road", "car")
        for batch in batches:
            assert batch["boxes"] is None and batch["masks"].dtype == np.uint8
            for row, sample_id in enumerate(batch["ids"].tolist()):
                plan = make_plan(SPEC, 5, 0, sample_id, (40, 50), 1)
                labels = np.asarray(Image.open(root / manifest.targets.sources[sample_id]))
                np.testing.assert_array_equal(batch["masks"][row], warp_mask(labels, plan, request.rules()))
        # A label map rewritten at another size since indexing: that sample is skipped, named.
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "s2.png")
        with Client(address) as client, client.stream("seg", spec=SPEC, batch_size=6, epochs=1, targets=request) as stream:
            batch = next(iter(stream))
            assert len(batch.sample_ids) == 5 and batch.masks.shape == (5, 48, 56)
            assert any("s2.png" in item and "label map is 10x10" in item for item in batch.skipped)


@pytest.mark.parametrize(
    ("dataset", "request_", "field"),
    [
        ("plain", TargetRequest(boxes=True), "open.targets.boxes"),
        ("seg", TargetRequest(keypoints=True), "open.targets.keypoints"),
        ("seg", TargetRequest(boxes=True), "open.targets.boxes"),
        ("plain", TargetRequest(masks=True), "open.targets.masks"),
    ],
)
def test_targets_a_dataset_lacks_are_refused_by_field(tmp_path, coco_file, dataset, request_, field):
    plain = tmp_path / "plain" / "cat"
    plain.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(plain / "a.png")
    seg = tmp_path / "seg"
    (seg / "images").mkdir(parents=True)
    (seg / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(seg / "images" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(seg / "masks" / "a.png")
    datasets = {"plain": DatasetConfig(str(tmp_path / "plain")), "seg": DatasetConfig(str(seg)), "coco": DatasetConfig(str(coco_file))}
    with running_server(datasets) as server, Client(f"127.0.0.1:{server.port}", reconnect=Reconnect(attempts=0)) as client:
        with pytest.raises(AugserveClientError) as caught:
            with client.stream(dataset, batch_size=1, targets=request_) as stream:
                next(iter(stream))
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in str(caught.value)
        # A bound the client library checks too, sent as a raw message: the server names it.
        opening = pb.OpenSession(dataset="coco", batch_size=1, spec=spec_to_proto(SPEC), targets=pb.TargetRequest(boxes=True, min_visibility=2.0))
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = pb_grpc.AugmentStub(channel).Stream(iter([pb.ClientMessage(open=opening)]), timeout=20)
            with pytest.raises(grpc.RpcError) as raw:
                list(call)
        assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "open.targets.min_visibility" in raw.value.details()
        # The server keeps serving: a good stream of the same server works.
        with client.stream("coco", spec=SPEC, batch_size=4, epochs=1, targets=TargetRequest(boxes=True)) as stream:
            assert sum(len(batch.sample_ids) for batch in stream) == 12


def test_targets_as_torch_tensors(coco_file):
    torch = pytest.importorskip("torch")
    with running_server({"coco": DatasetConfig(str(coco_file))}) as server, Client(f"127.0.0.1:{server.port}") as client:
        with client.stream("coco", spec=SPEC, batch_size=6, epochs=1, targets=REQUEST) as stream:
            images, targets = next(stream.torch_targets(use_tv_tensors=False))
    assert images.shape == (6, 3, 48, 56) and len(targets) == 6
    for target in targets:
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1:] == (4,)
        assert target["labels"].dtype == torch.int64 and len(target["labels"]) == len(target["boxes"])
        assert target["keypoints"].shape == (len(target["boxes"]), 3, 3)
        assert target["mask"].shape == (48, 56) and target["mask"].dtype == torch.int64


def test_targets_as_torchvision_tv_tensors(coco_file):
    pytest.importorskip("torch")
    from augserve.client.tensors import tv_tensors_module

    tv_tensors = tv_tensors_module()
    if tv_tensors is None:
        pytest.skip("torchvision is not importable against the installed torch (see README: torchvision)")
    with running_server({"coco": DatasetConfig(str(coco_file))}) as server, Client(f"127.0.0.1:{server.port}") as client:
        with client.stream("coco", spec=SPEC, batch_size=6, epochs=1, targets=REQUEST) as stream:
            _, targets = next(stream.torch_targets())
    for target in targets:
        assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and tuple(target["boxes"].canvas_size) == (48, 56)
        assert isinstance(target["mask"], tv_tensors.Mask)
