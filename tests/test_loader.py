"""AugserveLoader against a real server: DataLoader conventions (len, set_epoch, tensors on a
device), ranks' disjoint shards, and a mid-epoch checkpoint of a plain PyTorch loop (model,
optimizer, loader state) that a fresh loader resumes with exactly the batches of an
uninterrupted run."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from augserve.client.loader import AugserveLoader
from augserve.core.spec import AugmentSpec
from augserve.data.demo import DemoConfig, ensure_demo_dataset
from augserve.rpc.server import DatasetConfig
from servers import running_server

SPEC = AugmentSpec.from_dict({"ops": [{"rotate": {"degrees": 20}}, {"flip": {"horizontal": 0.5}}]})


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """60 images of 32x32: 50 to train on (4 batches of 16, the last of 2), 10 to validate."""
    root = ensure_demo_dataset(DemoConfig(images_per_class=12, image_size=32), root=tmp_path_factory.mktemp("tiny"))
    with running_server({"tiny": DatasetConfig(str(root), validation_fraction=0.2)}) as server:
        yield server


def loader_for(server, **options) -> AugserveLoader:
    return AugserveLoader(server.address, "tiny", batch_size=16, spec=SPEC, seed=3, transport="inband", **options)


def digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    return hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:16]


def test_len_epochs_and_tensors_follow_dataloader_conventions(tiny_server):
    with loader_for(tiny_server) as loader:
        assert len(loader) == 4
        first = [digest(images, labels) for images, labels in loader]
        images, labels = next(iter(loader))  # the next pass is the next epoch, by itself
        assert images.dtype == torch.float32 and images.shape == (16, 3, 32, 32) and labels.dtype == torch.int64
        assert loader.epoch == 1 and digest(images, labels) != first[0]
        loader.set_epoch(0)  # another epoch: from its first batch
        assert [digest(images, labels) for images, labels in loader] == first
        loader.set_epoch(1)
        assert loader.epoch == 1 and len([batch for batch in loader]) == 4


def test_ranks_read_disjoint_shards_that_cover_the_split(tiny_server):
    def images_of(**ranks) -> list[str]:
        with loader_for(tiny_server, normalize=False, **ranks) as loader:
            return [hashlib.sha256(image.numpy().tobytes()).hexdigest() for images, _ in loader for image in images]

    whole = images_of()
    shards = [images_of(rank=rank, world_size=2) for rank in (0, 1)]
    assert len(whole) == 50 and [len(shard) for shard in shards] == [25, 25]
    assert sorted(shards[0] + shards[1]) == sorted(whole)


def make_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def train(loader: AugserveLoader, model, optimizer, epochs: int, seen: list[str], stop_after: int | None = None):
    """A plain PyTorch loop; returns a checkpoint after `stop_after` steps, else None."""
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:
            seen.append(digest(images, labels))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            if len(seen) == stop_after:
                return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loader": loader.state_dict()}
    return None


def test_a_mid_epoch_checkpoint_resumes_with_exactly_the_next_batches(tiny_server, tmp_path):
    whole: list[str] = []
    model, optimizer = make_model()
    with loader_for(tiny_server) as loader:
        train(loader, model, optimizer, 3, whole)
    assert len(whole) == 12 and len(set(whole)) == 12

    cut: list[str] = []
    first_model, first_optimizer = make_model()
    with loader_for(tiny_server) as loader:
        checkpoint = train(loader, first_model, first_optimizer, 3, cut, stop_after=6)  # epoch 1, batch 2
    assert cut == whole[:6]
    torch.save(checkpoint, tmp_path / "checkpoint.pt")

    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain data only
    resumed_model, resumed_optimizer = make_model()
    resumed_model.load_state_dict(state["model"])
    resumed_optimizer.load_state_dict(state["optimizer"])
    with loader_for(tiny_server) as loader:  # a fresh loader and connection
        loader.load_state_dict(state["loader"])
        assert loader.epoch == 1
        train(loader, resumed_model, resumed_optimizer, 3, cut)
    assert cut == whole
    for name, value in resumed_model.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_a_state_of_another_stream_is_refused_by_field(tiny_server):
    with loader_for(tiny_server) as loader:
        next(iter(loader))
        state = loader.state_dict()
    with AugserveLoader(tiny_server.address, "tiny", batch_size=16, seed=4) as other, pytest.raises(ValueError, match="state.seed"):
        other.load_state_dict(state)
    with loader_for(tiny_server) as same, pytest.raises(ValueError, match="state.resume_tokens"):
        same.load_state_dict({**state, "resume_tokens": {5: []}})
