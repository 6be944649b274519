"""A loader with PyTorch's conventions over augserve streams.

    loader = AugserveLoader("127.0.0.1:50051", "demo", batch_size=64, spec=spec, device="cuda")
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:        # float32 [N, 3, H, W] normalized, int64 [N]
            ...
        checkpoint = {"model": ..., "optimizer": ..., "loader": loader.state_dict()}

It is used like a `torch.utils.data.DataLoader`: `len(loader)` is the batches per epoch of this
rank, each `iter()` is (the rest of) one epoch, and `state_dict()` / `load_state_dict()` work like
torchdata's `StatefulDataLoader`: the state is taken between batches, on the loader, and after
`load_state_dict` the next `iter()` yields exactly the batch that came after the last one yielded
before the state was taken (built on the server's resume tokens). Lightning finds the two methods
and checkpoints the loader mid-epoch by itself.

Data parallelism: rank and world size come from `torch.distributed` when a process group is
initialised (overridable); rank r of w with n servers reads shards r*n .. r*n+n-1 of w*n, so the
ranks' shards are disjoint and cover the split. Then `state_dict()` is a collective (call it on
every rank, as Lightning does): it gathers every rank's tokens, so that the one checkpoint rank 0
writes resumes every rank.

torch is imported when a batch is converted, so the client install stays free of it.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from augserve.client.connection import Client
from augserve.client.stream import BatchStream, ShardedStream, open_stream
from augserve.client.tensors import IMAGENET_MEAN, IMAGENET_STD, to_torch
from augserve.core.spec import AugmentSpec
from augserve.core.tokens import ResumeToken

STATE_VERSION = 1


def _distributed_ranks() -> tuple[int, int] | None:
    """(rank, world size) of an initialised torch.distributed process group, else None."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def _token_at(token: bytes, epoch: int) -> bytes:
    """A token of the same stream as `token` that starts `epoch` at its first sample."""
    return ResumeToken(ResumeToken.decode(token).stream_hash, epoch, 0).encode()


class AugserveLoader:
    """Batches of one split as (images, labels) torch tensors on `device`: images float32
    [N, 3, H, W] normalized by `mean`/`std` of [0, 1] pixels (uint8 [N, H, W, 3] with
    normalize=False), labels int64 [N].

    `servers`: endpoints ("host:port") or `Client`s (one per server: each serves its shard).
    `rank` / `world_size` default to torch.distributed's (0 / 1 without a process group).
    After a complete pass the loader moves to the next epoch by itself; `set_epoch(e)` chooses
    one (as `DistributedSampler.set_epoch`): the epoch it is in already changes nothing, another
    starts that epoch from its first batch. With `whole_passes` (validation) an iter() after a
    pass that stopped early starts the next epoch instead of finishing that one. `stream_options` are `Client.stream`'s (transport,
    prefetch, eval_size, group_policy, ...).
    """

    def __init__(
        self,
        servers: str | Client | Sequence[str | Client],
        dataset: str,
        *,
        batch_size: int = 32,
        spec: AugmentSpec | None = None,
        seed: int = 0,
        split: str = "train",
        drop_last: bool = False,
        device: Any = "cpu",
        normalize: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        rank: int | None = None,
        world_size: int | None = None,
        whole_passes: bool = False,
        **stream_options: Any,
    ) -> None:
        if isinstance(servers, (str, Client)):
            servers = [servers]
        if not servers:
            raise ValueError("servers: expected at least one endpoint or Client")
        self._owned = [Client(server) for server in servers if isinstance(server, str)]
        owned = iter(self._owned)
        self.clients = [server if isinstance(server, Client) else next(owned) for server in servers]
        ranks = _distributed_ranks()
        self._gathers = ranks is not None and rank is None and world_size is None and ranks[1] > 1
        self.rank = rank if rank is not None else (ranks[0] if ranks else 0)
        self.world_size = world_size if world_size is not None else (ranks[1] if ranks else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size ({self.world_size}), got {self.rank}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.split = split
        self.seed = seed
        self.device = device
        self.normalize = normalize
        self.mean, self.std = tuple(mean), tuple(std)
        self.whole_passes = whole_passes
        self._options = dict(stream_options, spec=spec, batch_size=batch_size, seed=seed, split=split, drop_last=drop_last)
        self._options.setdefault("cuda_device", device)  # batches on the trainer's GPU by CUDA IPC where it can
        self._epoch = 0
        self._yielded = 0  # batches of `_epoch` handed out
        self._tokens: list[bytes] | None = None  # one per server, just after the last batch handed out
        self._stream: BatchStream | ShardedStream | None = None
        self._batches: Iterator[Any] | None = None
        self._pending: Any = None  # a batch of the following epoch, read while looking for the end
        self._batches_per_epoch: int | None = None

    # --- the stream behind it ---

    def _open(self, tokens: Sequence[bytes] | None) -> BatchStream | ShardedStream:
        # epochs=0: one endless session, so the server's production carries on across epochs.
        return open_stream(
            self.clients, self.dataset, rank=self.rank, world_size=self.world_size,
            resume_tokens=tokens or (), epochs=0, **self._options,
        )

    def _ensure_stream(self) -> BatchStream | ShardedStream:
        if self._stream is not None:
            return self._stream
        tokens = self._tokens
        if tokens is None and self._epoch > 0:
            # No token yet to point at this epoch: learn each server's stream from a first batch.
            with self._open(None) as probe:
                streams = probe.streams if isinstance(probe, ShardedStream) else [probe]
                tokens = [next(iter(stream)).resume_token for stream in streams]
            tokens = self._tokens = [_token_at(token, self._epoch) for token in tokens]
        self._stream = self._open(tokens)
        self._batches = iter(self._stream)
        self._pending = None
        self._batches_per_epoch = self._stream.facts.batches_per_epoch
        return self._stream

    def _reposition(self) -> None:
        """The stream no longer stands where the state says: the next iter() opens it anew."""
        if self._stream is not None:
            self._stream.close()
        self._stream = self._batches = self._pending = None

    def _finish_epoch_if_done(self) -> None:
        if self._yielded and self._yielded >= len(self):
            self._epoch += 1
            self._yielded = 0

    # --- PyTorch's conventions ---

    def __len__(self) -> int:
        """Batches per epoch of this rank (of all its servers together)."""
        if self._batches_per_epoch is None:
            self._ensure_stream()
        return self._batches_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        self._finish_epoch_if_done()
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch: expected >= 0, got {epoch}")
        if epoch == self.epoch:
            return  # e.g. a resumed loader told the epoch it resumes in
        self._epoch, self._yielded = epoch, 0
        if self._tokens is not None:
            self._tokens = [_token_at(token, epoch) for token in self._tokens]
        self._reposition()

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        self._finish_epoch_if_done()
        if self.whole_passes and self._yielded:
            self.set_epoch(self._epoch + 1)
        self._ensure_stream()
        epoch, total = self._epoch, len(self)
        while self._yielded < total:
            if self._pending is not None:
                batch, self._pending = self._pending, None
            else:
                batch = next(self._batches, None)
            if batch is None:
                return
            if batch.epoch != epoch:  # fewer batches than announced (a policy skipped some)
                self._pending = batch
                self._epoch, self._yielded = batch.epoch, 0
                return
            self._yielded += 1
            self._tokens = list(self._stream.resume_tokens)
            yield to_torch(batch.images, batch.labels, self.device, self.normalize, self.mean, self.std)
        self._finish_epoch_if_done()

    # --- torchdata StatefulDataLoader's protocol ---

    def state_dict(self) -> dict[str, Any]:
        """Plain data (torch.save-able): where the next batch comes from. A collective under
        torch.distributed (see the module docstring)."""
        tokens = list(self._tokens) if self._tokens is not None else None
        per_rank = {self.rank: tokens}
        if self._gathers:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, (self.rank, tokens, self.epoch, self._yielded))
            per_rank = {rank: rank_tokens for rank, rank_tokens, _, _ in gathered}
        return {
            "version": STATE_VERSION,
            "dataset": self.dataset,
            "split": self.split,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "epoch": self.epoch,
            "batches_yielded": self._yielded,
            "resume_tokens": per_rank,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` (from `state_dict`) stood; the next iter() yields the batch
        after the last one yielded then. ValueError naming the field that does not fit."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state.version: expected {STATE_VERSION}, got {state.get('version')!r}")
        for name in ("dataset", "split", "seed", "batch_size", "world_size"):
            if state[name] != getattr(self, name):
                raise ValueError(f"state.{name}: the state is of {state[name]!r}, this loader of {getattr(self, name)!r}")
        tokens = state["resume_tokens"]
        if self.rank not in tokens:
            raise ValueError(f"state.resume_tokens: no tokens of rank {self.rank} (ranks {sorted(tokens)})")
        self._epoch, self._yielded = int(state["epoch"]), int(state["batches_yielded"])
        self._tokens = None if tokens[self.rank] is None else list(tokens[self.rank])
        self._reposition()

    # --- resources ---

    def pause(self, seconds: float = 0.0) -> None:
        """The training script stops reading for a while (validation, a checkpoint): the
        stream's group waits for it instead of detaching it as stalled (`BatchStream.pause`)."""
        if self._stream is not None:
            self._stream.pause(seconds)

    def resume(self) -> None:
        if self._stream is not None:
            self._stream.resume()

    def close(self) -> None:
        self._reposition()
        for client in self._owned:
            client.close()

    def __enter__(self) -> AugserveLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
