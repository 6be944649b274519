"""The whole configuration of a training run: data, model, optimizer, schedule, loss, run.

Loaded from a YAML file (sections named like the fields below) with command-line overrides on
top; the resolved configuration is written beside the run's outputs as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from augserve.core.config import (
    ConfigModel,
    Flag,
    Integer,
    NonNegativeInteger,
    Port,
    PositiveInteger,
    Text,
    config_dataclass,
)
from augserve.core.errors import SpecError
from augserve.core.spec import AugmentSpec, load_spec_file
from augserve.rpc.security import TlsFiles
from trainer.config import Seed
from trainer.losses import LossConfig
from trainer.mixing import MixingConfig
from trainer.models import ModelConfig
from trainer.optim import OptimizerConfig
from trainer.schedule import ScheduleConfig

DEVICES = ("auto", "cpu", "cuda")
GroupCount = Annotated[Integer, Field(ge=0, le=1024)]


def _square(value: Any) -> Any:
    # One number N is an N x N image.
    return (value, value) if isinstance(value, int) and not isinstance(value, bool) else value


ImageSize = Annotated[
    tuple[Annotated[Integer, Field(ge=1, le=8192)], ...], BeforeValidator(_square), Field(min_length=2, max_length=2)
]


def _device(device: str) -> str:
    if device.split(":")[0] not in DEVICES:
        raise ValueError(f"expected one of {list(DEVICES)} (cuda:N for one GPU), got {device!r}")
    return device


@config_dataclass
class DataConfig(ConfigModel):
    """Where batches come from. `spec` is a spec in plain data (as in a spec YAML file);
    `spec_file` names one instead; with neither, a resize to `image_size` only."""

    config_name = "data"

    endpoints: Annotated[tuple[Annotated[Text, Field(min_length=1)], ...], Field(min_length=1)] = Field(
        ("127.0.0.1:50051",), description="servers' host:port"
    )
    dataset: Annotated[Text, Field(min_length=1)] = Field("demo", description="the name of a dataset the servers serve")
    task: Literal["classification", "segmentation"] = Field(
        "classification", description="classification (a label per image) | segmentation (a label map per image: a dataset with masks)"
    )
    spec: dict[str, Any] | None = None
    spec_file: Text | None = Field(None, description="augmentation spec file (.yaml or .json)")
    image_size: ImageSize | None = Field(None, description="resize to [height, width] (or N) first, like Keras target_size")
    batch_size: PositiveInteger = 64
    eval_batch_size: PositiveInteger = 256
    epochs: PositiveInteger = 5
    # Keras fit(steps_per_epoch=...): an endless stream cut into epochs of this many batches
    steps_per_epoch: PositiveInteger | None = Field(None, description="as Keras fit(steps_per_epoch=...)")
    seed: Seed = 0
    transport: Literal["auto", "inband", "shared_memory"] = "auto"
    prefetch: Annotated[Integer, Field(ge=1, le=64)] = 4
    group_policy: Literal["lockstep", "detach", "alone"] = "lockstep"
    group_size: GroupCount = 0  # trainers expected on this same stream (a sweep sets it)
    # Trainers expected on this dataset order with any spec (same dataset, seed, batch size):
    # the server decodes each image once for all of them (a sweep sets it).
    decode_group_size: GroupCount = 0
    # The epochs of every trainer validating on this same validation stream, this one included
    # (a sweep sets it): at epoch e the validation stream waits for those with more than e
    # epochs, so that it is produced once for all of them.
    eval_group_epochs: Annotated[tuple[PositiveInteger, ...], Field(max_length=1024)] = ()
    validate: Flag = True
    tls_ca: Text | None = None  # PEM CA that signed the servers' certificates: use TLS
    tls_cert: Text | None = None  # client certificate and key, for mutual TLS
    tls_key: Text | None = None  # (the bearer token comes from $AUGSERVE_TOKEN, never a file here)

    def __post_init__(self) -> None:
        if self.spec is not None and self.spec_file is not None:
            raise SpecError("spec", "give spec or spec_file, not both")

    def tls_files(self) -> TlsFiles | None:
        if not (self.tls_ca or self.tls_cert or self.tls_key):
            return None
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_ca)

    def augment_spec(self) -> AugmentSpec:
        """The training spec: from `spec` or `spec_file`, after a resize to `image_size`."""
        if self.spec_file is not None:
            spec = load_spec_file(self.spec_file)
        else:
            spec = AugmentSpec.from_dict(dict(self.spec or {}))
        if self.image_size is None:
            return spec
        data = spec.to_dict()
        data["ops"] = [{"resize": {"size": list(self.image_size)}}] + data["ops"]
        return AugmentSpec.from_dict(data)


@config_dataclass
class RunConfig(ConfigModel):
    """Where outputs go and how the run behaves."""

    config_name = "run"

    output: Text = Field("runs/train", description="folder for config.yaml, metrics and checkpoint.pt")
    name: Text = ""
    device: Annotated[Text, AfterValidator(_device)] = Field("auto", description="auto | cpu | cuda | cuda:N")
    amp: Flag = True  # autocast on CUDA (bfloat16 where supported)
    deterministic: Flag = False  # torch deterministic algorithms: exact resume on CPU
    log_every: PositiveInteger = 20  # steps between metric lines
    # optimizer steps between mid-epoch checkpoints (0: epoch ends)
    checkpoint_every: NonNegativeInteger = Field(0, description="optimizer steps between mid-epoch checkpoints")
    max_steps: NonNegativeInteger = 0  # stop (with a checkpoint) after this many optimizer steps; 0: no limit
    progress: Flag = Field(True, description="a progress bar per epoch on a terminal")
    threads: Annotated[Integer, Field(ge=0, le=1024)] = Field(0, description="torch CPU threads (0: torch's default)")
    metrics_port: Port | None = Field(
        None, description="serve Prometheus metrics (data-wait fraction, images/s, loss) here (rank 0)"
    )


@config_dataclass
class TrainConfig(ConfigModel):
    """The whole run: one section a field. Errors name fields from the section on
    (``optimizer.learning_rate``)."""

    config_name = ""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    SECTIONS = {
        "data": DataConfig,
        "model": ModelConfig,
        "optimizer": OptimizerConfig,
        "schedule": ScheduleConfig,
        "loss": LossConfig,
        "mixing": MixingConfig,
        "run": RunConfig,
    }

    def replace(self, section: str, **changes: Any) -> TrainConfig:
        """A copy with fields of one section changed (validated again)."""
        try:
            changed = dataclasses.replace(getattr(self, section), **changes)
        except SpecError as error:
            raise SpecError(f"{section}.{error.field}", error.message) from None
        return dataclasses.replace(self, **{section: changed})
