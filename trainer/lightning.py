"""Lightning: a LightningDataModule whose loaders stream from augserve servers.

    datamodule = AugserveDataModule(["127.0.0.1:50051"], "demo", batch_size=64, spec=spec)
    trainer = lightning.Trainer(max_epochs=5)          # or pytorch_lightning.Trainer
    trainer.fit(model, datamodule=datamodule)
    trainer.fit(model, datamodule=datamodule, ckpt_path="last.ckpt")   # resumes mid-epoch too

The training loader is an `AugserveLoader`: Lightning sees its `state_dict` / `load_state_dict`
and keeps its state in every checkpoint ("loops.fit_loop.state_dict.combined_loader"), so a run
resumed from a mid-epoch checkpoint trains on exactly the batches an uninterrupted one would
have. Its `len()` is known, so Lightning fetches no batch ahead of the step. Under DDP every rank
reads its own shard (the rank comes from torch.distributed); Lightning's distributed sampler is
not involved (these are not torch DataLoaders).

`datamodule.pause_for_validation` (a Callback: `pl.Trainer(callbacks=[...])`) pauses the
training streams while Lightning validates, so that runs of a sweep sharing one stream keep
their group through validation instead of being detached as stalled.

The validation loader streams the validation split resized and centre-cropped to `eval_size`
(default: the training output size), each pass the whole split of this rank (also after a
pass cut short, such as Lightning's sanity check). Batches are CPU
tensors by default: Lightning moves them to the module's device (pass `device` to normalize on
the GPU instead).
"""

from __future__ import annotations

from typing import Any, Sequence

import pytorch_lightning as pl

from augserve.client.connection import Client
from augserve.client.loader import AugserveLoader
from augserve.client.tensors import IMAGENET_MEAN, IMAGENET_STD
from augserve.core.spec import AugmentSpec


class PauseForValidation(pl.Callback):
    """Pauses the data module's training streams while Lightning validates (and resumes them
    after), so that a sweep's shared group waits for this run rather than detaching it as
    stalled: `pl.Trainer(callbacks=[datamodule.pause_for_validation])`."""

    def __init__(self, datamodule: AugserveDataModule) -> None:
        self.datamodule = datamodule

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for loader in self.datamodule.train_loaders:
            loader.pause()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for loader in self.datamodule.train_loaders:
            loader.resume()


class AugserveDataModule(pl.LightningDataModule):
    """Train and validation loaders of dataset `dataset` on `servers` (endpoints or Clients)."""

    def __init__(
        self,
        servers: str | Sequence[str],
        dataset: str,
        *,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        spec: AugmentSpec | None = None,
        seed: int = 0,
        eval_size: tuple[int, int] | None = None,
        device: Any = "cpu",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        **stream_options: Any,
    ) -> None:
        super().__init__()
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.dataset = dataset
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.spec = spec
        self.seed = seed
        self.eval_size = eval_size
        self.device = device
        self.mean, self.std = tuple(mean), tuple(std)
        self.stream_options = stream_options
        self._clients: list[Client] = []
        self._loaders: list[AugserveLoader] = []
        self.train_loaders: list[AugserveLoader] = []
        self.pause_for_validation = PauseForValidation(self)

    def _clients_now(self) -> list[Client]:
        if not self._clients:
            self._clients = [Client(endpoint) for endpoint in self.servers]
        return self._clients

    def _loader(self, **options: Any) -> AugserveLoader:
        loader = AugserveLoader(
            self._clients_now(), self.dataset, seed=self.seed, device=self.device, mean=self.mean, std=self.std,
            **self.stream_options, **options,
        )
        self._loaders.append(loader)
        return loader

    def train_dataloader(self) -> AugserveLoader:
        loader = self._loader(batch_size=self.batch_size, spec=self.spec)
        self.train_loaders.append(loader)
        return loader

    def val_dataloader(self) -> AugserveLoader:
        eval_size = self.eval_size
        if eval_size is None and self.spec is not None:
            eval_size = self.spec.fixed_output_size
        return self._loader(batch_size=self.eval_batch_size, split="validation", eval_size=eval_size,
                            whole_passes=True)

    def teardown(self, stage: str) -> None:
        for loader in self._loaders:
            loader.close()
        for client in self._clients:
            client.close()
        self._loaders, self._clients, self.train_loaders = [], [], []
