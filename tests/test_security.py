"""TLS, mutual TLS and bearer tokens on a real server; bad credentials fail cleanly and the
server keeps serving."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import write_pki

from augserve.client import AugserveClientError, Client
from augserve.core.spec import AugmentSpec
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.security import TlsFiles
from augserve.rpc.server import DatasetConfig, ServerConfig, create_server

SPEC = AugmentSpec.from_dict({"ops": [{"random_resized_crop": {"size": 16}}]})


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """A self-signed CA, a server certificate for 127.0.0.1 and a client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    tokens = folder / "tokens"
    tokens.write_text("# tokens of this test\nsecret-one\nsecret-two\n")
    return {**write_pki(folder), "tokens": str(tokens)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, DatasetConfig]:
    root = ensure_demo_dataset(DemoConfig(images_per_class=4, image_size=32), root=tmp_path_factory.mktemp("data"))
    return {"shapes": DatasetConfig(str(root))}


def stream_one(client: Client) -> int:
    with client.stream("shapes", spec=SPEC, batch_size=4, epochs=1) as stream:
        return sum(len(batch.sample_ids) for batch in stream)


def test_tls_with_tokens_admits_the_right_token_only(pki, dataset):
    server = create_server(ServerConfig(
        backend="opencv", datasets=dataset, tls_cert=pki["server_cert"], tls_key=pki["server_key"], token_file=pki["tokens"]
    ))
    try:
        trusted = TlsFiles(peer_ca=pki["ca"])
        with Client(server.address, token="secret-two", tls=trusted) as good:
            assert stream_one(good) == 20
            assert good.server_info().backend == "opencv"
        for token in (None, "wrong"):
            with Client(server.address, token=token, tls=trusted) as bad:
                with pytest.raises(AugserveClientError) as caught:
                    stream_one(bad)
                assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in caught.value.message
                with pytest.raises(AugserveClientError) as caught:
                    bad.list_datasets()
                assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        # Plaintext against a TLS port fails cleanly, with a status rather than a hang.
        with Client(server.address, token="secret-one", timeout=5) as plaintext, pytest.raises(AugserveClientError) as caught:
            plaintext.list_datasets()
        assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        # Health checks need no token (probes of load balancers and Kubernetes).
        with grpc.secure_channel(server.address, grpc.ssl_channel_credentials(Path(pki["ca"]).read_bytes())) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        # And the server still serves.
        with Client(server.address, token="secret-one", tls=trusted) as good:
            assert stream_one(good) == 20
    finally:
        server.stop(grace=1.0)


def test_mutual_tls_requires_a_client_certificate(pki, dataset):
    server = create_server(ServerConfig(
        backend="opencv", datasets=dataset, tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"]
    ))
    try:
        with Client(server.address, tls=TlsFiles(pki["client_cert"], pki["client_key"], pki["ca"])) as client:
            assert stream_one(client) == 20
        with Client(server.address, tls=TlsFiles(peer_ca=pki["ca"]), timeout=5) as anonymous, pytest.raises(AugserveClientError) as caught:
            anonymous.list_datasets()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=1.0)


def test_tokens_from_the_environment_and_the_loud_warning(dataset, monkeypatch, caplog):
    monkeypatch.setenv("AUGSERVE_TOKENS", "env-token")
    server = create_server(ServerConfig(backend="opencv", datasets=dataset))
    try:
        monkeypatch.setenv("AUGSERVE_TOKEN", "env-token")
        with Client(server.address) as client:
            assert stream_one(client) == 20
        monkeypatch.delenv("AUGSERVE_TOKEN")
        with Client(server.address) as client, pytest.raises(AugserveClientError) as caught:
            client.list_datasets()
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(grace=1.0)
    monkeypatch.delenv("AUGSERVE_TOKENS")
    caplog.set_level("WARNING", logger="augserve.rpc.server")
    exposed = create_server(ServerConfig(host="0.0.0.0", backend="opencv", datasets=dataset))
    exposed.stop(grace=0.5)
    assert any("WITHOUT TLS OR TOKENS" in record.getMessage() for record in caplog.records)
