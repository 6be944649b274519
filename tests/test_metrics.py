"""Prometheus endpoints: the server's state per session and group, and the trainer's gauges;
the server's endpoint against hostile clients (no token, wrong token, half-sent requests)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from reliability_helpers import VerifyingControlClient, write_png_dataset
from servers import fetch, scrape, wait_until

from augserve.client import Client
from augserve.core.spec import AugmentSpec
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.metrics import (
    REQUEST_READ_SECONDS,
    HeadState,
    MetricsEndpoint,
    PendingHeads,
    bearer_token_admitted,
)
from augserve.rpc.server import DatasetConfig, ServerConfig, create_server
from trainer.metrics import TrainerGauges

SERVER_FAMILIES = {"augserve_backend_info", "augserve_sessions", "augserve_producers", "augserve_batches_produced", "augserve_production_seconds"}


def closed_by_server(connection: socket.socket, timeout: float) -> bool:
    """Whether the server closes `connection` within `timeout` seconds: end of stream, or a
    reset when it closed before reading what was sent."""
    connection.settimeout(max(0.01, timeout))
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def metrics_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("augserve-metrics")]


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


def test_with_tokens_a_scrape_needs_one_of_them(tmp_path, monkeypatch):
    """Session ids and dataset names are for token holders only, as the gRPC calls are."""
    monkeypatch.delenv("AUGSERVE_TOKENS", raising=False)
    token_file = tmp_path / "tokens"
    token_file.write_text("secret-one\nsecret-two\n")
    server = create_server(ServerConfig(backend="opencv", threads=2, metrics_port=0, token_file=str(token_file)))
    try:
        port = server.metrics.port
        for authorization in (None, "Bearer wrong", "Bearer secret-on", "Bearer secret-one2", "secret-one", "Basic secret-one", "Bearer "):
            status, headers, body = fetch(port, authorization=authorization)
            assert status == 401, authorization
            assert headers["WWW-Authenticate"].startswith("Bearer")
            assert "augserve_" not in body
        for token in ("secret-one", "secret-two"):
            status, headers, body = fetch(port, authorization=f"Bearer {token}")
            assert status == 200 and headers["Content-Type"] == CONTENT_TYPE_LATEST
            assert SERVER_FAMILIES <= {family.name for family in text_string_to_metric_families(body)}
        assert fetch(port, "/", "Bearer secret-one")[0] == 404
        assert fetch(port, "/metrics/../secrets", "Bearer secret-one")[0] == 404
    finally:
        server.stop(grace=1.0)
    assert not metrics_threads()


@pytest.mark.parametrize(
    ("metrics_host", "tokens", "expected"),
    [(None, "", "127.0.0.1"), ("127.0.0.3", "", "127.0.0.3"), (None, "secret", "127.0.0.2")],
    ids=["open-on-loopback", "explicit-host", "tokens-on-the-grpc-host"],
)
def test_an_open_endpoint_listens_on_loopback_unless_told(monkeypatch, metrics_host, tokens, expected):
    """The gRPC server is on 127.0.0.2 (loopback too, on Linux, so nothing is exposed), which
    tells its host and the loopback default apart."""
    monkeypatch.setenv("AUGSERVE_TOKENS", tokens)
    server = create_server(ServerConfig(host="127.0.0.2", backend="opencv", threads=2, metrics_port=0, metrics_host=metrics_host))
    try:
        assert server.metrics.host == expected
        with socket.create_connection((expected, server.metrics.port), timeout=5):
            pass
    finally:
        server.stop(grace=1.0)
    assert MetricsEndpoint.bind_host(None, "0.0.0.0", ()) == "127.0.0.1"
    assert MetricsEndpoint.bind_host("0.0.0.0", "127.0.0.1", ()) == "0.0.0.0"


def test_half_sent_requests_hold_no_threads_and_are_cut_at_the_read_timeout(tmp_path):
    """300 connections that send "GET /metr" and stall: the thread count stays put, a proper
    scrape is answered meanwhile, the server closes every stalled socket after the read
    timeout, and a gRPC control client streams on, byte for byte."""
    root = write_png_dataset(tmp_path / "png")
    server = create_server(ServerConfig(backend="opencv", threads=2, datasets={"control": DatasetConfig(str(root))}, metrics_port=0))
    control = VerifyingControlClient(server.address, "control", root)
    stalled: list[socket.socket] = []
    try:
        seen = control.check()
        threads_before = threading.active_count()
        for _ in range(300):
            stalled.append(socket.create_connection(("127.0.0.1", server.metrics.port), timeout=5))
            stalled[-1].sendall(b"GET /metr")
        last_sent = time.monotonic()
        # Accepted after the 300 (one accept queue), so answered once they all were accepted.
        values = scrape(server.metrics.port)
        assert values["augserve_sessions"] == 1
        assert threading.active_count() <= threads_before + 2, threading.active_count() - threads_before
        seen = control.check(since=seen)
        deadline = last_sent + REQUEST_READ_SECONDS + 5.0
        assert all(closed_by_server(connection, deadline - time.monotonic()) for connection in stalled)
        assert threading.active_count() <= threads_before + 2
        control.check(since=seen)
        assert scrape(server.metrics.port)["augserve_sessions"] == 1
    finally:
        for connection in stalled:
            connection.close()
        control.finish()
        server.stop(grace=1.0)
    assert not metrics_threads()


def test_close_is_prompt_with_a_request_half_sent():
    server = create_server(ServerConfig(backend="opencv", threads=2, metrics_port=0))
    try:
        with socket.create_connection(("127.0.0.1", server.metrics.port), timeout=5) as half_sent:
            half_sent.sendall(b"GET /metrics HTTP/1.1\r\n")
            assert len(metrics_threads()) == 5  # the I/O thread and four workers, whatever comes
            started = time.monotonic()
            server.metrics.close()
            assert time.monotonic() - started < 2.0 and not metrics_threads()
            assert closed_by_server(half_sent, 5.0)
    finally:
        server.stop(grace=1.0)


# ---- the decisions, without sockets ----


def test_pending_heads_complete_refuse_and_expire():
    pending: PendingHeads[str] = PendingHeads(capacity=3, read_seconds=3.0, max_head_bytes=64)
    for key in ("crlf", "lf", "closed", "large"):
        assert pending.admit(key, now=0.0) == ([] if key != "large" else ["crlf"])
    assert pending.admit("crlf", now=0.5) == ["lf"]
    assert pending.feed("crlf", b"GET /metrics HTTP/1.1\r\nHost: x\r") == (HeadState.WAITING, b"")
    assert pending.feed("crlf", b"\n\r\nignored") == (HeadState.COMPLETE, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert pending.feed("closed", b"GET /me") == (HeadState.WAITING, b"")
    assert pending.feed("closed", b"") == (HeadState.REFUSED, b"")
    assert pending.feed("large", b"GET /" + b"x" * 64) == (HeadState.REFUSED, b"")
    assert len(pending) == 0 and pending.seconds_to_next_deadline(0.0) is None
    assert pending.admit("lf", now=1.0) == [] and pending.admit("late", now=2.0) == []
    assert pending.feed("lf", b"GET /metrics\n\n") == (HeadState.COMPLETE, b"GET /metrics\n\n")
    assert pending.seconds_to_next_deadline(3.0) == 2.0
    assert pending.expired(4.9) == [] and pending.expired(5.0) == ["late"] and len(pending) == 0


def test_bearer_tokens_are_matched_whole():
    tokens = (b"secret-one", b"secret-two")
    assert bearer_token_admitted("Bearer secret-two", tokens) and bearer_token_admitted("bearer  secret-one ", tokens)
    for value in (None, "", "Bearer", "Bearer secret", "Bearer secret-one-more", "Basic secret-one", "secret-one"):
        assert not bearer_token_admitted(value, tokens), value
    assert not bearer_token_admitted("Bearer ", ())
