"""CUDA IPC as a Stream transport, through a real server and client on 127.0.0.1: chosen by
`auto` only for a client on the server's host that names the server's GPU, refused by field
otherwise, slots released and device rings freed.

Without a GPU the driver is the stand-in of tests/fake_cuda.py (device memory is a shared-memory
file), so what runs here is every augserve part of the path: the proto fields, the choice, the
device ring of a producer, the handle's travel, the client's mapping and slot lifecycle. The
backend here is OpenCV, whose batches are copied up into the ring (the server's
`cuda_ipc_device`); the DALI GPU backend writing the ring itself is tests/test_dali_pipeline.py's
GPU test, and benchmarks/gpu_check.py runs this transport end to end on a GPU."""

from __future__ import annotations

import os

import cv2
import grpc
import numpy as np
import pytest

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve._proto.augserve.v1 import augserve_pb2_grpc as pb_grpc
from augserve.client import AugserveClientError, Client, Reconnect
from augserve.client.devices import cuda_ordinal
from augserve.core.errors import SpecError
from augserve.core.spec import AugmentSpec
from augserve.core.targets import TargetRequest
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.server import DatasetConfig, ServerConfig, create_server
from augserve.streaming.limits import Limits
from augserve.transport.cuda_ipc import DRIVER_LIBRARY_VARIABLE, CudaDriver, CudaSlot
from augserve.transport.ring import write_probe, remove_probe
from fake_cuda import fake_device_files
from servers import wait_until

SPEC = AugmentSpec.from_dict({"ops": [{"rotate": {"degrees": 20}}, {"flip": {}}, {"random_resized_crop": {"size": 24, "scale": [0.5, 1]}}]})
FAKE_UUID = bytes([0xAB]) * 16  # what the stand-in driver reports for its one device


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, DatasetConfig]:
    """An ImageFolder tree, and a label-map folder (images/ + masks/) for the masks rule."""
    root = tmp_path_factory.mktemp("data")
    shapes = ensure_demo_dataset(DemoConfig(images_per_class=6, image_size=40), root=root / "shapes")
    scenes = root / "scenes"
    (scenes / "images").mkdir(parents=True)
    (scenes / "masks").mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        cv2.imwrite(str(scenes / "images" / f"{index}.png"), rng.integers(0, 256, (32, 32, 3), np.uint8))
        cv2.imwrite(str(scenes / "masks" / f"{index}.png"), rng.integers(0, 3, (32, 32), np.uint8))
    return {"shapes": DatasetConfig(str(shapes)), "scenes": DatasetConfig(str(scenes))}


@pytest.fixture(scope="module")
def stand_in_driver(fake_driver):
    """Server and client in this process load the stand-in driver (a fresh driver object on
    each side of the module, so no other test sees it)."""
    previous = os.environ.get(DRIVER_LIBRARY_VARIABLE)
    os.environ[DRIVER_LIBRARY_VARIABLE] = fake_driver
    CudaDriver._shared = None
    yield fake_driver
    CudaDriver._shared = None
    if previous is None:
        del os.environ[DRIVER_LIBRARY_VARIABLE]
    else:
        os.environ[DRIVER_LIBRARY_VARIABLE] = previous


@pytest.fixture(scope="module")
def gpu_server(stand_in_driver, datasets):
    """OpenCV batches kept for CUDA IPC on device 0."""
    server = create_server(ServerConfig(backend="opencv", threads=2, cuda_ipc_device=0, datasets=datasets, limits=Limits(max_batch_size=64)))
    try:
        yield server
    finally:
        server.stop(grace=2.0)


@pytest.fixture
def client(gpu_server):
    with Client(gpu_server.address, timeout=60, reconnect=Reconnect(attempts=0)) as client:
        yield client


def received(stream) -> list[tuple[list[int], list[int], bytes, int]]:
    """(sample ids, labels, pixel bytes, epoch) of every batch, copied before the next."""
    out = []
    for batch in stream:
        pixels = batch.images.to_host() if isinstance(batch.images, CudaSlot) else np.array(batch.images)
        out.append((batch.sample_ids.tolist(), batch.labels.tolist(), pixels.tobytes(), batch.epoch))
    return out


def test_auto_delivers_over_cuda_ipc_the_bytes_in_band_delivers(client):
    """A client naming the server's GPU gets CUDA IPC slots: two epochs of 3-image batches
    through a 2-batch window (so every slot is released and reused many times) equal the
    in-band stream byte for byte, batch for batch."""
    with client.stream("shapes", spec=SPEC, batch_size=3, epochs=2, seed=5, prefetch=2, cuda_device="cuda:0") as stream:
        assert stream.facts.transport == "cuda_ipc"
        device_batches = received(stream)
    with client.stream("shapes", spec=SPEC, batch_size=3, epochs=2, seed=5, transport="inband") as stream:
        inband_batches = received(stream)
    assert len(device_batches) == len(inband_batches) == 2 * 10
    assert device_batches == inband_batches


def test_the_slot_is_a_device_array_of_the_batch(client):
    """ReceivedBatch.images is a CudaSlot: its CUDA array interface names the mapped slot and
    the batch's shape, on the trainer's device 0."""
    with client.stream("shapes", spec=SPEC, batch_size=4, epochs=1, transport="cuda_ipc", cuda_device=0) as stream:
        batch = next(iter(stream))
        assert isinstance(batch.images, CudaSlot) and batch.images.device == 0
        interface = batch.images.__cuda_array_interface__
        assert interface["shape"] == (4, 24, 24, 3) and interface["typestr"] == "|u1" and interface["version"] == 3
        assert batch.images.to_host().shape == (4, 24, 24, 3)


def test_a_resume_token_from_cuda_ipc_continues_in_band(client):
    """The transport is not part of a stream's identity: a token from a CUDA IPC batch resumes
    the same stream in-band, with the batches an uninterrupted run gives."""
    with client.stream("shapes", spec=SPEC, batch_size=4, epochs=1, seed=2, transport="inband") as stream:
        whole = received(stream)
    with client.stream("shapes", spec=SPEC, batch_size=4, epochs=1, seed=2, cuda_device=0) as stream:
        assert stream.facts.transport == "cuda_ipc"
        first_three = []
        for batch in stream:
            first_three.append((batch.sample_ids.tolist(), batch.labels.tolist(), batch.images.to_host().tobytes(), batch.epoch))
            if len(first_three) == 3:
                token = batch.resume_token
                break
    with client.stream("shapes", spec=SPEC, batch_size=4, epochs=1, seed=2, transport="inband", resume_token=token) as stream:
        rest = received(stream)
    assert first_three + rest == whole


def test_a_closed_stream_frees_its_device_ring(client, gpu_server):
    """The producer's device memory (a stand-in allocation file here) is freed when the only
    session on it closes."""
    before = set(fake_device_files(os.getpid()))
    with client.stream("shapes", spec=SPEC, batch_size=2, epochs=0, seed=9, cuda_device=0) as stream:
        next(iter(stream))
        assert len(set(fake_device_files(os.getpid())) - before) == 1
    assert wait_until(lambda: not set(fake_device_files(os.getpid())) - before, timeout=20)


def test_auto_without_a_gpu_or_with_masks_takes_shared_memory(client):
    """No cuda_device, or label masks asked for: auto takes shared memory on this host; masks
    by name over CUDA IPC are refused by field."""
    with client.stream("shapes", spec=SPEC, batch_size=4, epochs=1) as stream:
        assert stream.facts.transport == "shared_memory"
    masks = TargetRequest(masks=True)
    with client.stream("scenes", spec=SPEC, batch_size=2, epochs=1, targets=masks, cuda_device=0) as stream:
        assert stream.facts.transport == "shared_memory"
        assert next(iter(stream)).masks.shape == (2, 24, 24)
    with pytest.raises(AugserveClientError) as refused:
        next(iter(client.stream("scenes", spec=SPEC, batch_size=2, epochs=1, targets=masks, transport="cuda_ipc", cuda_device=0)))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "open.transport" in refused.value.message and "open.targets.masks" in refused.value.message


def open_raw(address: str, **fields) -> grpc.RpcError | pb.SessionInfo:
    """Open a session with a hand-made OpenSession: its SessionInfo, or the error."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.AugmentStub(channel)
        message = pb.OpenSession(dataset="shapes", batch_size=2, epochs=1, **fields)
        call = stub.Stream(iter([pb.ClientMessage(open=message)]), timeout=30)
        try:
            return next(call).info
        except grpc.RpcError as error:
            return error
        finally:
            call.cancel()


def test_hostile_opens_are_refused_by_field_and_the_server_serves_on(client, gpu_server):
    """Another GPU's UUID, a UUID of the wrong length, the right UUID without the same-host
    proof, and CUDA IPC from a client that names no GPU: INVALID_ARGUMENT naming the field
    and why; the next client streams as before."""
    probe, nonce = write_probe()
    try:
        other_gpu = open_raw(gpu_server.address, transport=pb.TRANSPORT_CUDA_IPC, cuda_device_uuid=bytes(16), shm_probe_name=probe, shm_probe_nonce=nonce)
        short = open_raw(gpu_server.address, cuda_device_uuid=b"\x01" * 5)
        no_proof = open_raw(gpu_server.address, transport=pb.TRANSPORT_CUDA_IPC, cuda_device_uuid=FAKE_UUID)
        no_gpu = open_raw(gpu_server.address, transport=pb.TRANSPORT_CUDA_IPC, shm_probe_name=probe, shm_probe_nonce=nonce)
        proven = open_raw(gpu_server.address, cuda_device_uuid=FAKE_UUID, shm_probe_name=probe, shm_probe_nonce=nonce)
    finally:
        remove_probe(probe)
    refusals = {
        "another GPU": (other_gpu, "open.transport", "is not the server's GPU"),
        "short UUID": (short, "open.cuda_device_uuid", "5 bytes"),
        "no same-host proof": (no_proof, "open.transport", "not on the server's host"),
        "no GPU named": (no_gpu, "open.transport", "named no GPU"),
    }
    for case, (error, field, reason) in refusals.items():
        assert isinstance(error, grpc.RpcError), case
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert field in error.details() and reason in error.details(), (case, error.details())
    assert proven.transport == pb.TRANSPORT_CUDA_IPC and len(proven.cuda_ipc_handle) == 64 and proven.cuda_device_uuid == FAKE_UUID
    with client.stream("shapes", spec=SPEC, batch_size=4, epochs=1, cuda_device=0) as stream:
        assert len(received(stream)) == 8


def test_a_cpu_server_serves_no_cuda_ipc(stand_in_driver, datasets):
    """Without cuda_ipc_device a CPU backend keeps no batches on a GPU: auto takes shared
    memory, CUDA IPC by name is refused saying so; a client asking for it without a GPU of its
    own is refused before it sends anything."""
    with create_server(ServerConfig(backend="opencv", threads=1, datasets=datasets)) as server, Client(server.address, timeout=60) as client:
        with client.stream("shapes", spec=SPEC, batch_size=4, epochs=1, cuda_device=0) as stream:
            assert stream.facts.transport == "shared_memory"
        with pytest.raises(AugserveClientError) as refused:
            next(iter(client.stream("shapes", spec=SPEC, batch_size=4, epochs=1, transport="cuda_ipc", cuda_device=0)))
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "keeps no batches on a GPU" in refused.value.message
        with pytest.raises(AugserveClientError) as no_device:
            client.stream("shapes", spec=SPEC, transport="cuda_ipc", cuda_device="cpu")
        assert no_device.value.code == grpc.StatusCode.FAILED_PRECONDITION and "not a CUDA device" in no_device.value.message


def test_a_server_asked_for_a_gpu_it_cannot_see_does_not_start(stand_in_driver, datasets):
    with pytest.raises(SpecError, match=r"config.cuda_ipc_device.*GPU 3"):
        create_server(ServerConfig(backend="opencv", threads=1, cuda_ipc_device=3, datasets=datasets))


@pytest.mark.parametrize(
    ("device", "ordinal"), [(0, 0), (2, 2), ("cuda:1", 1), ("cpu", None), (None, None), ("cuda:x", None), (True, None)]
)
def test_a_trainer_device_names_its_cuda_ordinal(device, ordinal):
    assert cuda_ordinal(device) == ordinal
