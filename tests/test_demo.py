"""The demo dataset: deterministic real JPEG files in an ImageFolder tree."""

from __future__ import annotations

from augserve.data.demo import CLASSES, DemoConfig, ensure_demo_dataset
from augserve.core.images import inspect_image


def test_generation_is_deterministic_and_cached(tmp_path):
    config = DemoConfig(images_per_class=3, image_size=48)
    first = ensure_demo_dataset(config, root=tmp_path / "a")
    second = ensure_demo_dataset(config, root=tmp_path / "b")
    files = sorted(path.relative_to(first) for path in first.rglob("*.jpg"))
    assert [path.parts[0] for path in files] == [name for name in sorted(CLASSES) for _ in range(3)]
    for relative in files:
        data = (first / relative).read_bytes()
        assert data == (second / relative).read_bytes()
        header = inspect_image(data, str(relative))
        assert (header.format, header.height, header.width) == ("JPEG", 48, 48)
    stamp = (first / files[0]).stat().st_mtime_ns
    assert ensure_demo_dataset(config, root=tmp_path / "a") == first
    assert (first / files[0]).stat().st_mtime_ns == stamp


def test_default_dataset_has_every_class(demo_root):
    for name in CLASSES:
        assert len(list((demo_root / name).glob("*.jpg"))) == DemoConfig().images_per_class
