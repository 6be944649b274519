"""Prometheus endpoints: the server's state per session and group, and the trainer's gauges."""

from __future__ import annotations

import urllib.request

from augserve.client import Client
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.server import DatasetConfig, ServerConfig, create_server
from augserve.core.spec import AugmentSpec
from servers import wait_until
from trainer.metrics import TrainerGauges


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("augserve"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_server_metrics_follow_sessions_groups_and_errors(tmp_path):
    root = ensure_demo_dataset(DemoConfig(images_per_class=4, image_size=32), root=tmp_path / "data")
    (next((root / "circle").iterdir())).write_bytes(b"not an image")
    spec = AugmentSpec.from_dict({"ops": [{"random_resized_crop": {"size": 16}}]})
    server = create_server(ServerConfig(backend="opencv", datasets={"shapes": DatasetConfig(str(root))}, metrics_port=0))
    try:
        with Client(server.address) as client:
            first = client.stream("shapes", spec=spec, batch_size=4, epochs=0, group_size=2)
            second = client.stream("shapes", spec=spec, batch_size=4, epochs=0, group_size=2)
            for stream in (first, second):
                batches = iter(stream)
                for _ in range(6):
                    next(batches)
            values = scrape(server.metrics.port)
            assert values['augserve_backend_info{backend="opencv",device="cpu"}'] == 1
            assert values["augserve_sessions"] == 2 and values["augserve_producers"] == 1
            assert values['augserve_group_members{dataset="shapes",producer="' + str(next(iter(server.manager.producers))) + '"}'] == 2
            assert values[f'augserve_session_batches_total{{dataset="shapes",session="{first.facts.session_id}"}}'] >= 6
            assert values["augserve_images_skipped_total"] >= 1  # the file that is not an image
            assert values["augserve_production_seconds_count"] == values["augserve_batches_produced_total"] > 0
            assert any(name.startswith("augserve_session_credits") for name in values)
            first.close()
            second.close()
        assert wait_until(lambda: not server.manager.sessions)
        assert not any(name.startswith("augserve_session_") for name in scrape(server.metrics.port))
    finally:
        server.stop(grace=1.0)


def test_trainer_gauges_report_the_data_wait_fraction():
    gauges = TrainerGauges(0)
    try:
        gauges.update({"data_wait_fraction": 0.25, "images_per_second": 812.0, "step": 7})
        values = scrape(gauges.port)
        assert values["augserve_trainer_data_wait_fraction"] == 0.25
        assert values["augserve_trainer_images_per_second"] == 812.0 and values["augserve_trainer_step"] == 7
    finally:
        gauges.close()
