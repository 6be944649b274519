"""The whole configuration of a training run: data, model, optimizer, schedule, loss, run.

Loaded from a YAML file (sections named like the fields below) with command-line overrides on
top; the resolved configuration is written beside the run's outputs as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from augserve.core.errors import SpecError
from augserve.core.plan import MAX_SEED
from augserve.core.spec import AugmentSpec, load_spec_file
from augserve.rpc.security import TlsFiles
from trainer.config import check_bool, check_choice, check_integer, config_from_dict, config_to_dict
from trainer.losses import LossConfig
from trainer.mixing import MixingConfig
from trainer.models import ModelConfig
from trainer.optim import OptimizerConfig
from trainer.schedule import ScheduleConfig

TRANSPORTS = ("auto", "inband", "shared_memory")
GROUP_POLICIES = ("lockstep", "detach", "alone")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DataConfig:
    """Where batches come from. `spec` is a spec in plain data (as in a spec YAML file);
    `spec_file` names one instead; with neither, a resize to `image_size` only."""

    endpoints: tuple[str, ...] = ("127.0.0.1:50051",)
    dataset: str = "demo"
    spec: Mapping[str, Any] | None = None
    spec_file: str | None = None
    image_size: tuple[int, int] | None = None  # resize to this first (Keras target_size)
    batch_size: int = 64
    eval_batch_size: int = 256
    epochs: int = 5
    steps_per_epoch: int | None = None  # Keras fit(steps_per_epoch=...): an endless stream cut
    seed: int = 0
    transport: str = "auto"
    prefetch: int = 4
    group_policy: str = "lockstep"
    group_size: int = 0  # trainers expected on this same stream (a sweep sets it)
    # Trainers expected on this dataset order with any spec (same dataset, seed, batch size):
    # the server decodes each image once for all of them (a sweep sets it).
    decode_group_size: int = 0
    # The epochs of every trainer validating on this same validation stream, this one included
    # (a sweep sets it): at epoch e the validation stream waits for those with more than e
    # epochs, so that it is produced once for all of them.
    eval_group_epochs: tuple[int, ...] = ()
    validate: bool = True
    tls_ca: str | None = None  # PEM CA that signed the servers' certificates: use TLS
    tls_cert: str | None = None  # client certificate and key, for mutual TLS
    tls_key: str | None = None  # (the bearer token comes from $AUGSERVE_TOKEN, never a file here)

    def __post_init__(self) -> None:
        if not self.endpoints or not all(isinstance(e, str) and e for e in self.endpoints):
            raise SpecError("endpoints", "expected a non-empty list of host:port strings")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise SpecError("dataset", "required: the name of a dataset the server serves")
        if self.spec is not None and self.spec_file is not None:
            raise SpecError("spec", "give spec or spec_file, not both")
        if self.image_size is not None:
            object.__setattr__(self, "image_size", _size("image_size", self.image_size))
        check_integer("batch_size", self.batch_size, low=1)
        check_integer("eval_batch_size", self.eval_batch_size, low=1)
        check_integer("epochs", self.epochs, low=1)
        if self.steps_per_epoch is not None:
            check_integer("steps_per_epoch", self.steps_per_epoch, low=1)
        check_integer("seed", self.seed, low=0, high=MAX_SEED)
        check_choice("transport", self.transport, TRANSPORTS)
        check_integer("prefetch", self.prefetch, low=1, high=64)
        check_choice("group_policy", self.group_policy, GROUP_POLICIES)
        check_integer("group_size", self.group_size, low=0, high=1024)
        check_integer("decode_group_size", self.decode_group_size, low=0, high=1024)
        if not isinstance(self.eval_group_epochs, tuple) or len(self.eval_group_epochs) > 1024:
            raise SpecError("eval_group_epochs", f"expected a list of at most 1024 epoch counts, got {self.eval_group_epochs!r}")
        for index, epochs in enumerate(self.eval_group_epochs):
            check_integer(f"eval_group_epochs[{index}]", epochs, low=1)
        check_bool("validate", self.validate)

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


def _size(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise SpecError(name, f"expected [height, width] or one number, got {value!r}")
    return (check_integer(f"{name}[0]", value[0], low=1, high=8192), check_integer(f"{name}[1]", value[1], low=1, high=8192))


@dataclass(frozen=True)
class RunConfig:
    """Where outputs go and how the run behaves."""

    output: str = "runs/train"
    name: str = ""
    device: str = "auto"
    amp: bool = True  # autocast on CUDA (bfloat16 where supported)
    deterministic: bool = False  # torch deterministic algorithms: exact resume on CPU
    log_every: int = 20  # steps between metric lines
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints (0: epoch ends)
    max_steps: int = 0  # stop (with a checkpoint) after this many optimizer steps; 0: no limit
    progress: bool = True
    threads: int = 0  # torch CPU threads (0: torch's default)
    metrics_port: int | None = None  # Prometheus /metrics of this trainer (rank 0), if set

    def __post_init__(self) -> None:
        check_choice("device", self.device.split(":")[0], DEVICES)
        check_bool("amp", self.amp)
        check_bool("deterministic", self.deterministic)
        check_integer("log_every", self.log_every, low=1)
        check_integer("checkpoint_every", self.checkpoint_every, low=0)
        check_integer("max_steps", self.max_steps, low=0)
        check_bool("progress", self.progress)
        check_integer("threads", self.threads, low=0, high=1024)
        if self.metrics_port is not None:
            check_integer("metrics_port", self.metrics_port, low=0, high=65535)


@dataclass(frozen=True)
class TrainConfig:
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TrainConfig:
        data = data or {}
        if not isinstance(data, Mapping):
            raise SpecError("config", "expected a mapping of sections")
        for key in data:
            if key not in cls.SECTIONS:
                raise SpecError(str(key), f"unknown section; known: {sorted(cls.SECTIONS)}")
        sections = {}
        for name, section in cls.SECTIONS.items():
            sections[name] = config_from_dict(section, data.get(name), name)
        return cls(**sections)

    def to_dict(self) -> dict[str, Any]:
        return {name: config_to_dict(getattr(self, name)) for name in self.SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, section: str, **changes: Any) -> TrainConfig:
        """A copy with fields of one section changed (validated again)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data["a"]["b"] = value for dotted "a.b" (creating sections as needed). A number indexes
    a list that is already there: "data.spec.ops.1.rand_augment.magnitude" sets the magnitude
    of the spec's second op."""
    *path, last = dotted.split(".")
    target: Any = data
    for key in path:
        if isinstance(target, list):
            target = target[_list_index(dotted, target, key)]
        else:
            target = target.setdefault(key, {})
        if not isinstance(target, (dict, list)):
            raise SpecError(dotted, f"{key} is not a section")
    if isinstance(target, list):
        target[_list_index(dotted, target, last)] = value
    else:
        target[last] = value


def _list_index(dotted: str, items: list[Any], key: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise SpecError(dotted, f"{key!r} is not an index of a list of {len(items)}")
    return int(key)
