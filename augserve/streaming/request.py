"""A validated request to open a session, in augserve's own types (the rpc layer builds it)."""

from __future__ import annotations

from dataclasses import dataclass

from augserve.core.policy import BadImagePolicy
from augserve.core.spec import AugmentSpec
from augserve.core.targets import TargetRequest
from augserve.streaming.keys import ResumeToken


@dataclass(frozen=True)
class SessionRequest:
    """What a client asked for. Limits that depend on the server are checked by the manager."""

    dataset: str
    split: str  # train | validation | all
    spec: AugmentSpec
    batch_size: int
    seed: int
    epochs: int  # 0: endless
    shard_index: int
    shard_count: int
    transport: str  # auto | inband | shared_memory | cuda_ipc
    prefetch: int  # 0: the server's default
    resume: ResumeToken | None
    bad_image_policy: BadImagePolicy
    drop_last: bool
    group_policy: str  # lockstep | detach | alone
    group_size: int
    shm_probe_name: str
    shm_probe_nonce: bytes
    max_chunk_bytes: int = 0  # in-band: most pixel bytes per Chunk message; 0: the default
    decode_group_size: int = 0  # sessions expected on this dataset order, any spec (a new producer waits for them)
    targets: TargetRequest = TargetRequest()  # boxes, keypoints, masks besides the images
    cuda_device_uuid: bytes = b""  # the GPU the client wants batches on (CUDA IPC); b"": none
