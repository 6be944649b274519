"""A connection to one augserve server."""

from __future__ import annotations

from typing import Any

import grpc

from augserve._proto.augserve.v1 import augserve_pb2 as pb
from augserve._proto.augserve.v1 import augserve_pb2_grpc as pb_grpc
from augserve.client.devices import gpu_uuid
from augserve.client.errors import AugserveClientError
from augserve.client.stream import BatchStream, Reconnect
from augserve.core.spec import AugmentSpec
from augserve.core.targets import TargetRequest
from augserve.rpc.convert import (
    BAD_IMAGE_VALUES,
    GROUP_POLICY_VALUES,
    SPLIT_VALUES,
    TRANSPORT_VALUES,
    spec_to_proto,
    targets_to_proto,
)
from augserve.rpc import keepalive
from augserve.rpc.compression import CODECS, COMPRESSION_VALUES, CodecUnavailable, Compression
from augserve.rpc.security import TlsFiles, channel_credentials, client_token
from augserve.transport.ring import shared_memory_available

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", 4 << 20),
    *keepalive.CLIENT_OPTIONS,
]


class Client:
    """A connection to one augserve server. `tls` (its `peer_ca` verifies the server; add a
    certificate and key for mutual TLS) and `token` (default: $AUGSERVE_TOKEN) when the server
    asks for them."""

    def __init__(
        self,
        endpoint: str,
        timeout: float | None = None,
        token: str | None = None,
        tls: TlsFiles | None = None,
        reconnect: Reconnect = Reconnect(),
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout  # unary calls: their deadline; streams: longest wait for a message
        self.reconnect = reconnect
        if tls is None:
            self._channel = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(endpoint, channel_credentials(tls), options=CHANNEL_OPTIONS)
        token = client_token(token)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._stub = pb_grpc.AugmentStub(self._channel)

    def list_datasets(self) -> list[pb.DatasetInfo]:
        try:
            return list(self._stub.ListDatasets(pb.ListDatasetsRequest(), timeout=self.timeout or 30, metadata=self._metadata).datasets)
        except grpc.RpcError as error:
            raise AugserveClientError.from_rpc(error) from None

    def server_info(self) -> pb.ServerInfo:
        try:
            return self._stub.GetServerInfo(pb.ServerInfoRequest(), timeout=self.timeout or 30, metadata=self._metadata)
        except grpc.RpcError as error:
            raise AugserveClientError.from_rpc(error) from None

    def describe_ops(self) -> pb.DescribeOpsResponse:
        """The server's op vocabulary: every op and parameter with type, unit, bounds, default."""
        try:
            return self._stub.DescribeOps(pb.DescribeOpsRequest(), timeout=self.timeout or 30, metadata=self._metadata)
        except grpc.RpcError as error:
            raise AugserveClientError.from_rpc(error) from None

    def stream(
        self,
        dataset: str,
        *,
        spec: AugmentSpec | None = None,
        batch_size: int = 32,
        seed: int = 0,
        epochs: int = 1,
        split: str = "train",
        shard_index: int = 0,
        shard_count: int = 1,
        transport: str = "auto",
        prefetch: int = 0,
        resume_token: bytes = b"",
        on_bad_image: str = "skip",
        drop_last: bool = False,
        eval_size: tuple[int, int] | None = None,
        group_policy: str = "lockstep",
        group_size: int = 0,
        compression: str = "none",
        compression_level: int = 0,
        decode_group_size: int = 0,
        targets: TargetRequest | None = None,
        cuda_device: Any = None,
    ) -> BatchStream:
        """Open a session. epochs=0 streams endlessly; transport is auto | inband | shared_memory
        | cuda_ipc.
        Sessions of the same stream share one producer; `group_size` makes a new group wait
        (at most the server's group_wait_seconds) for that many members before producing.

        `compression` (none | zstd | lz4) has the server encode in-band chunks, at
        `compression_level` (0: the codec's default; zstd -7 to 9, lz4 -8 to 9); for slow links
        only: photographs shrink to about 0.7–0.9 of their size. Decoding needs the codec's package
        (zstandard, lz4; both in augserve[compression]): without it, AugserveClientError
        FAILED_PRECONDITION before anything is sent. Ignored on shared memory.

        Sessions on the same dataset order (dataset, split, seed, batch size, shard) share
        reading and decoding whatever their specs; `decode_group_size` makes a new producer wait
        (at most group_wait_seconds) until that many such sessions have opened, so that every
        image is decoded once for all of them from the first batch. `stream.pause()` /
        `resume()` (or `with stream.paused():`) around a break in reading keeps the group.

        `targets` (a dataset with annotations: a COCO file or a label-map folder) asks for boxes,
        keypoints and label masks through each sample's augmentation with every batch
        (`ReceivedBatch.boxes`, `.keypoints`, `.masks`; `stream.torch_targets()` as tensors).

        `cuda_device` ("cuda:N", an ordinal or a torch.device) is the GPU the trainer wants its
        batches on: a server on this host that keeps its batches on that very GPU (the dali-gpu
        backend) then delivers them there by CUDA IPC (`transport` auto, or "cuda_ipc" to insist):
        `ReceivedBatch.images` is a `CudaSlot` on that GPU and `stream.torch("cuda:N")` wraps it
        without a copy. Label masks never travel so (auto then takes shared memory)."""
        choice = Compression(compression, compression_level)  # ValueError naming the argument
        cuda_uuid, no_gpu = gpu_uuid(cuda_device) if transport in ("auto", "cuda_ipc") else (b"", "")
        if transport == "cuda_ipc" and not cuda_uuid:
            raise AugserveClientError(grpc.StatusCode.FAILED_PRECONDITION, f"transport='cuda_ipc': {no_gpu}")
        if choice.enabled:
            try:
                CODECS[choice.codec].library()
            except CodecUnavailable as error:
                raise AugserveClientError(
                    grpc.StatusCode.FAILED_PRECONDITION, f"compression={compression!r}: decoding {error}"
                ) from None
        open_message = pb.OpenSession(
            dataset=dataset,
            split=SPLIT_VALUES[split],
            batch_size=batch_size,
            seed=seed,
            epochs=epochs,
            shard_index=shard_index,
            shard_count=shard_count,
            transport=TRANSPORT_VALUES[transport],
            prefetch=prefetch,
            resume_token=resume_token,
            on_bad_image=BAD_IMAGE_VALUES[on_bad_image],
            drop_last=drop_last,
            eval_size=list(eval_size or ()),
            group_policy=GROUP_POLICY_VALUES[group_policy],
            group_size=group_size,
            compression=COMPRESSION_VALUES[choice.codec] if choice.enabled else pb.COMPRESSION_UNSPECIFIED,
            compression_level=choice.level,
            decode_group_size=decode_group_size,
            cuda_device_uuid=cuda_uuid,
        )
        if spec is not None:
            open_message.spec.CopyFrom(spec_to_proto(spec))
        if targets is not None and targets.any:
            open_message.targets.CopyFrom(targets_to_proto(targets))
        return BatchStream(
            self._stub,
            open_message,
            shared_memory_probe=transport != "inband" and shared_memory_available(),
            idle_timeout=self.timeout,
            metadata=self._metadata,
            reconnect=self.reconnect,
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
