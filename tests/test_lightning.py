"""Lightning with AugserveDataModule: fit a small model, checkpoint in the middle of an epoch,
resume from the Lightning checkpoint, and train on exactly the batches of an uninterrupted run."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from augserve.core.spec import AugmentSpec  # noqa: E402
from augserve.data.demo import DemoConfig, ensure_demo_dataset  # noqa: E402
from augserve.rpc.server import DatasetConfig  # noqa: E402
from servers import running_server, wait_until  # noqa: E402
from trainer.lightning import AugserveDataModule  # noqa: E402

SPEC = AugmentSpec.from_dict({"ops": [{"rotate": {"degrees": 20}}, {"flip": {"horizontal": 0.5}}, {"resize": {"size": [32, 32]}}]})


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """50 training images of 32x32 (4 batches of 16), 10 validation images."""
    root = ensure_demo_dataset(DemoConfig(images_per_class=12, image_size=32), root=tmp_path_factory.mktemp("tiny"))
    with running_server({"tiny": DatasetConfig(str(root), validation_fraction=0.2)}) as server:
        yield server


class Recorder(pl.LightningModule):
    """A linear classifier that records a digest of every training batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))
        self.seen: list[str] = []
        self.validated = 0

    def training_step(self, batch, batch_index):
        images, labels = batch
        self.seen.append(hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:16])
        loss = nn.functional.cross_entropy(self.layer(images), labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_index):
        images, labels = batch
        self.validated += len(labels)
        self.log("val_loss", nn.functional.cross_entropy(self.layer(images), labels))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def trainer_for(folder, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, default_root_dir=folder, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
    )


def datamodule_for(server) -> AugserveDataModule:
    return AugserveDataModule(server.address, "tiny", batch_size=16, eval_batch_size=8, spec=SPEC, seed=5, transport="inband")


# Lightning 2.6 on torch 2.13 warns about its own use of torch.utils._pytree.LeafSpec.
@pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated:FutureWarning")
def test_resuming_a_mid_epoch_lightning_checkpoint_trains_on_exactly_the_same_batches(tiny_server, tmp_path):
    whole = Recorder()
    trainer_for(tmp_path / "whole", 10).fit(whole, datamodule=datamodule_for(tiny_server))
    assert len(whole.seen) == 10 and len(set(whole.seen)) == 10  # 2.5 epochs of 4 batches
    # The sanity check (its 2 batches of 8 are the whole split), then after each whole epoch.
    assert whole.validated == 3 * 10

    cut = Recorder()
    trainer = trainer_for(tmp_path / "cut", 6)
    trainer.fit(cut, datamodule=datamodule_for(tiny_server))
    assert cut.seen == whole.seen[:6]  # stopped in epoch 1 after its second batch
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    loader_state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader_state["epoch"], loader_state["batches_yielded"]) == (1, 2)

    resumed = Recorder()
    trainer_for(tmp_path / "cut", 10).fit(resumed, datamodule=datamodule_for(tiny_server), ckpt_path=tmp_path / "mid.ckpt")
    assert cut.seen + resumed.seen == whole.seen
    for name, value in resumed.state_dict().items():
        assert torch.allclose(value, whole.state_dict()[name], atol=1e-6), name


class PauseWatcher(Recorder):
    """Records, at every validation batch, whether the server holds this run's training
    session as paused. The pause travels on the stream's own message queue, so the server
    may see it a moment after validation starts: each check waits for it up to 10 s."""

    def __init__(self, server) -> None:
        super().__init__()
        self.server = server
        self.paused_while_validating: list[bool] = []

    def training_sessions(self) -> list:
        return [session for session in self.server.manager.sessions.values() if session.key.split == "train"]

    def all_training_paused(self) -> bool:
        return wait_until(lambda: all(session.paused(time.monotonic()) for session in self.training_sessions()), interval=0.02)

    def validation_step(self, batch, batch_index):
        if self.training_sessions():  # none yet during the sanity check before the first epoch
            self.paused_while_validating.append(self.all_training_paused())
        return super().validation_step(batch, batch_index)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated:FutureWarning")
def test_the_training_stream_is_paused_while_lightning_validates(tiny_server, tmp_path):
    datamodule = datamodule_for(tiny_server)
    watcher = PauseWatcher(tiny_server)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[datamodule.pause_for_validation],
    )
    trainer.fit(watcher, datamodule=datamodule)
    assert watcher.paused_while_validating and all(watcher.paused_while_validating), watcher.paused_while_validating
