"""The Python client: streams of augmented batches as numpy arrays or torch tensors.

    with Client("127.0.0.1:50051") as client:
        with client.stream("demo", spec=spec, batch_size=64, epochs=2) as stream:
            for batch in stream:                 # numpy: images [N, H, W, 3] uint8
                ...
            # or: for images, labels in stream.torch("cuda"): float [N, 3, H, W], normalized

Every failure reaches the caller as `AugserveClientError` (status code, message, and the last
resume token when the server gave one).
"""

from augserve.client.connection import Client
from augserve.client.errors import AugserveClientError
from augserve.client.loader import AugserveLoader
from augserve.client.stream import (
    BatchStream,
    EpochSummary,
    ReceivedBatch,
    Reconnect,
    SessionFacts,
    ShardedStream,
    open_stream,
)
from augserve.client.tensors import IMAGENET_MEAN, IMAGENET_STD, to_torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugserveClientError",
    "AugserveLoader",
    "BatchStream",
    "Client",
    "EpochSummary",
    "ReceivedBatch",
    "Reconnect",
    "SessionFacts",
    "ShardedStream",
    "open_stream",
    "to_torch",
]
