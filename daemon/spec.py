"""The job file: its schema, its strict and friendly validation, and its normalised form.

The seed's request body is a valid job file verbatim; every other key is optional with the
default written beside it (`Field` descriptions double as the "Expected:" half of error
messages). Validation is strict: numbers are not parsed from strings, an unknown key is an error
that suggests the closest valid one, and every problem in a file is reported at once.

A validated `JobSpec` is then normalised (`normalise`): defaults filled, the seed's
`algorithm_params.early_stopping_patience` / `learning_rate_scheduler` moved to their full
forms, paths resolved against the daemon's base folder and checked against its allowed roots.
The normalised dict is what `job_accepted` records and what the worker trains from.
"""
import difflib
import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import BadJobFile

MAX_JOB_FILE_BYTES = 1 << 20  # a job file is a few hundred bytes; 1 MiB is plenty
MAX_NESTING = 32

FRAMEWORK_ALIASES = {"torch": "pytorch", "pytorch": "pytorch", "tf": "tensorflow",
                     "tensorflow": "tensorflow", "keras": "tensorflow"}
SCHEDULE_ALIASES = {"constant": "none", "steplr": "step", "multisteplr": "multistep",
                    "exponentiallr": "exponential", "cosineannealinglr": "cosine",
                    "cosine_annealing": "cosine", "reducelronplateau": "plateau",
                    "reduce_on_plateau": "plateau", "one_cycle": "onecycle",
                    "onecyclelr": "onecycle"}
METRIC_ALIASES = {"loss": "train_loss", "accuracy": "train_accuracy", "acc": "train_accuracy",
                  "mae": "train_mae", "rmse": "train_rmse", "val_acc": "val_accuracy"}
MONITORS = ("val_loss", "train_loss", "val_accuracy", "train_accuracy", "val_mae", "val_rmse",
            "val_r2", "train_mae", "train_rmse")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _monitor(value: Any) -> Any:
    if isinstance(value, str):
        value = METRIC_ALIASES.get(value, value)
        if value not in MONITORS:
            raise ValueError(f"unknown metric {value!r}; one of {', '.join(MONITORS)}")
    return value


# ------------------------------------------------------------------ learning-rate schedules

class NoSchedule(Strict):
    name: Literal["none"]


class StepSchedule(Strict):
    name: Literal["step"]
    step_size: int = Field(30, ge=1, description="a whole number of epochs >= 1, e.g. 30")
    gamma: float = Field(0.1, gt=0, le=1, allow_inf_nan=False, description="a factor in (0, 1], e.g. 0.1")


class MultiStepSchedule(Strict):
    name: Literal["multistep"]
    milestones: list[Annotated[int, Field(ge=1)]] = Field(
        [30, 60, 90], min_length=1, description="increasing 0-based epochs, e.g. [30, 60, 90]")
    gamma: float = Field(0.1, gt=0, le=1, allow_inf_nan=False, description="a factor in (0, 1], e.g. 0.1")

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("milestones must be strictly increasing")
        return v


class ExponentialSchedule(Strict):
    name: Literal["exponential"]
    gamma: float = Field(0.95, gt=0, le=1, allow_inf_nan=False, description="a factor in (0, 1], e.g. 0.95")


class CosineSchedule(Strict):
    name: Literal["cosine"]
    warmup_epochs: int = Field(0, ge=0, description="a whole number of epochs >= 0")
    warmup_start_factor: float = Field(0.1, gt=0, le=1, allow_inf_nan=False,
                                       description="a factor in (0, 1], e.g. 0.1")
    t_max: int | None = Field(None, ge=1, description="epochs of the cosine after warmup; "
                                                      "default: epochs - warmup_epochs")
    eta_min: float = Field(0.0, ge=0, allow_inf_nan=False, description="the final rate, >= 0")


class PlateauSchedule(Strict):
    name: Literal["plateau"]
    monitor: str = Field("val_loss", description=f"one of {', '.join(MONITORS)}")
    mode: Literal["auto", "min", "max"] = Field("auto", description='"auto", "min" or "max"')
    factor: float = Field(0.1, gt=0, lt=1, allow_inf_nan=False, description="a factor in (0, 1), e.g. 0.1")
    patience: int = Field(10, ge=0, description="a whole number of epochs >= 0")
    threshold: float = Field(1e-4, ge=0, allow_inf_nan=False, description="a number >= 0, e.g. 0.0001")
    threshold_mode: Literal["rel", "abs"] = Field("rel", description='"rel" or "abs"')
    cooldown: int = Field(0, ge=0, description="a whole number of epochs >= 0")
    min_lr: float = Field(0.0, ge=0, allow_inf_nan=False, description="a rate >= 0")

    _check_monitor = field_validator("monitor", mode="before")(_monitor)


class OneCycleSchedule(Strict):
    name: Literal["onecycle"]
    max_lr: float | None = Field(None, gt=0, allow_inf_nan=False,
                                 description="the peak rate; default: learning_rate")
    pct_start: float = Field(0.3, gt=0, lt=1, allow_inf_nan=False, description="a fraction in (0, 1)")
    div_factor: float = Field(25.0, gt=0, allow_inf_nan=False, description="a number > 0, e.g. 25")
    final_div_factor: float = Field(1e4, gt=0, allow_inf_nan=False, description="a number > 0, e.g. 10000")
    anneal_strategy: Literal["cos", "linear"] = Field("cos", description='"cos" or "linear"')
    three_phase: bool = Field(False, description="true or false")


SCHEDULES = {m.model_fields["name"].annotation.__args__[0]: m for m in (
    NoSchedule, StepSchedule, MultiStepSchedule, ExponentialSchedule, CosineSchedule,
    PlateauSchedule, OneCycleSchedule)}

Schedule = Annotated[Union[tuple(SCHEDULES.values())], Field(discriminator="name")]
SCHEDULE_HELP = ('a name ("' + '", "'.join(SCHEDULES) + '") or an object {"name": ..., params}')


def _schedule(value: Any) -> Any:
    """Accept "step" for {"name": "step"}; names are case-insensitive, torch's class names too."""
    if isinstance(value, str):
        value = {"name": value}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        name = value["name"].strip().lower()
        value = {**value, "name": SCHEDULE_ALIASES.get(name, name)}
    return value


# ------------------------------------------------------------------ the other sections

class AlgorithmParams(Strict):
    model_type: Literal["mlp", "linear", "resnet"] = Field(
        "mlp", description='"mlp", "linear" (no hidden layers) or "resnet" (mlp with skips)')
    hidden_units: list[Annotated[int, Field(ge=1, le=1 << 16)]] = Field(
        [128, 64, 32], max_length=64, description="a list of up to 64 layer widths, each in [1, 65536], e.g. [128, 64, 32]")
    dropout_rate: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False,
                                description="a fraction in [0, 1), e.g. 0.2")
    activation: Literal["relu", "gelu", "tanh", "sigmoid", "leaky_relu", "elu", "silu", "selu"] = Field(
        "relu", description='"relu", "gelu", "tanh", "sigmoid", "leaky_relu", "elu", "silu" or "selu"')
    batch_norm: bool = Field(False, description="true or false")
    early_stopping_patience: int | None = Field(
        None, ge=0, description="a whole number of epochs >= 0 (the seed's short form)")
    learning_rate_scheduler: Schedule | None = Field(None, description=SCHEDULE_HELP)

    _check_schedule = field_validator("learning_rate_scheduler", mode="before")(_schedule)


class Optimizer(Strict):
    name: Literal["adam", "adamw", "sgd", "rmsprop"] = Field(
        "adam", description='"adam", "adamw", "sgd" or "rmsprop"')
    weight_decay: float | None = Field(None, ge=0, allow_inf_nan=False,
                                       description="a number >= 0; default 0 (0.01 for adamw)")
    momentum: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False, description="a number in [0, 1)")
    nesterov: bool = Field(False, description="true or false")
    betas: list[Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]] = Field(
        [0.9, 0.999], min_length=2, max_length=2, description="two numbers in [0, 1), e.g. [0.9, 0.999]")
    eps: float = Field(1e-8, gt=0, allow_inf_nan=False, description="a small number > 0, e.g. 1e-8")


class EarlyStopping(Strict):
    monitor: str = Field("val_loss", description=f"one of {', '.join(MONITORS)}")
    mode: Literal["auto", "min", "max"] = Field("auto", description='"auto", "min" or "max"')
    patience: int = Field(10, ge=0, description="a whole number of epochs >= 0, e.g. 10")
    min_delta: float = Field(0.0, ge=0, allow_inf_nan=False, description="a number >= 0")
    baseline: float | None = Field(None, allow_inf_nan=False, description="a number, or null")
    start_from_epoch: int = Field(0, ge=0, description="a whole number of epochs >= 0")
    restore_best_weights: bool = Field(False, description="true or false")

    _check_monitor = field_validator("monitor", mode="before")(_monitor)


class CheckpointPolicy(Strict):
    every_epochs: int = Field(1, ge=0, description="a whole number >= 0 (0: only on pause and shutdown)")
    every_seconds: float | None = Field(None, gt=0, allow_inf_nan=False,
                                        description="seconds > 0, or null")
    keep_last: int = Field(3, ge=1, le=10_000, description="a whole number in [1, 10000]")
    keep_best: bool = Field(True, description="true or false")


class Distributed(Strict):
    strategy: Literal["ddp", "mirrored"] = Field(
        "ddp", description='"ddp" (PyTorch DistributedDataParallel) or "mirrored" (TensorFlow '
                           "MirroredStrategy)")
    processes: int = Field(2, ge=1, le=64, description="a whole number in [1, 64] of ranks on this machine")
    replicas: int = Field(2, ge=1, le=64,
                          description="a whole number in [1, 64] of MirroredStrategy replicas (devices)")
    nnodes: int = Field(1, ge=1, le=1024, description="a whole number in [1, 1024] of machines")
    node_rank: int = Field(0, ge=0, le=1023, description="this machine's place, 0 .. nnodes-1")
    rdzv_endpoint: str | None = Field(
        None, min_length=3, max_length=300, pattern=r"^[^\s:]+:[0-9]{1,5}$",
        description='"host:port" where node 0 hosts the rendezvous, e.g. "10.0.0.1:29400"')
    workers: list[Annotated[str, Field(min_length=3, max_length=300, pattern=r"^[^\s:]+:[0-9]{1,5}$")]] | None = Field(
        None, min_length=2, max_length=1024,
        description='"mirrored" on several machines: every machine\'s "host:port" in node_rank '
                    'order, the same list in each job file, e.g. ["10.0.0.1:12345", "10.0.0.2:12345"]')
    rdzv_id: str = Field("epochd", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$",
                         description="letters, digits, . _ -: the same on every node")
    rdzv_timeout: float = Field(900, ge=10, le=86400, allow_inf_nan=False,
                                description="seconds in [10, 86400] the nodes wait for each other")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description='"auto" (nccl between GPUs, gloo on the CPU), "gloo" or "nccl"')


class Limits(Strict):
    memory_mb: int | None = Field(None, ge=64, le=16 * 1024 * 1024,
                                  description="megabytes in [64, 16777216] of worker memory (RSS), or null")
    wall_seconds: float | None = Field(None, ge=1, allow_inf_nan=False,
                                       description="seconds >= 1 of training, all runs together, or null")


def text_encoding(name: str) -> str:
    """`name` if Python has a text codec by that name; ValueError otherwise."""
    try:
        "a".encode(name)  # a LookupError for names Python lacks and for bytes codecs (base64)
    except LookupError:
        raise ValueError(f"{name!r} is not a text encoding Python knows; expected one such as "
                         '"utf-8", "cp1252", "latin-1" or "utf-16"') from None
    return name


class DataOptions(Strict):
    format: Literal["auto", "csv", "parquet"] = Field("auto", description='"auto", "csv" or "parquet"')
    delimiter: str = Field(",", min_length=1, max_length=1, description='one character, e.g. ","')
    decimal: Literal[".", ","] = Field(".", description='"." or ",": the decimal mark of the '
                                                         'numbers in a CSV (Excel in much of Europe '
                                                         'writes "1,5" in ";"-separated files)')
    missing_values: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        [], max_length=100, description='a list of cell texts that mean "no value", e.g. ["?", '
                                        '"-"] (empty cells, NA, NaN and null always do)')
    encoding: str = Field("utf-8", min_length=1, max_length=40,
                          description='a text encoding, e.g. "utf-8", "cp1252" (Excel on Windows), '
                                      '"latin-1" or "utf-16"')
    streaming: bool = Field(False, description="true or false: train from disk in chunks, for "
                                              "data larger than memory")
    chunk_rows: int = Field(65_536, ge=1, le=1 << 24,
                            description="a whole number in [1, 16777216]: streaming rows per chunk")
    shuffle_chunks: int = Field(4, ge=1, le=4096,
                                description="a whole number in [1, 4096]: streaming chunks shuffled together")
    max_categories: int = Field(50, ge=2, le=10_000,
                                description="a whole number in [2, 10000]: distinct values a text column may have")

    _check_encoding = field_validator("encoding")(lambda v: text_encoding(v))


class JobSpec(Strict):
    name: str | None = Field(None, min_length=1, max_length=200, description="a short text")
    algorithm_type: Literal["deep_learning"] = Field("deep_learning", description='"deep_learning"')
    framework: Literal["pytorch", "tensorflow"] = Field(
        "pytorch", description='"pytorch" (alias "torch") or "tensorflow" (alias "tf")')
    task: Literal["auto", "classification", "regression"] = Field(
        "auto", description='"auto", "classification" or "regression"')
    epochs: int = Field(10, ge=1, le=1_000_000, description="a whole number in [1, 1000000], e.g. 10")
    batch_size: int = Field(32, ge=1, le=1 << 24, description="a whole number in [1, 16777216], e.g. 32")
    learning_rate: float = Field(1e-3, gt=0, le=10, allow_inf_nan=False,
                                 description="a number in (0, 10], e.g. 0.001")
    train_data_path: str = Field(min_length=1, max_length=4096,
                                 description='path to a CSV or Parquet file, e.g. "data/train.csv"')
    val_data_path: str | None = Field(None, min_length=1, max_length=4096,
                                      description="path to a CSV or Parquet file, or null")
    validation_split: float = Field(0.2, ge=0, le=0.9, allow_inf_nan=False,
                                    description="a fraction in [0, 0.9], e.g. 0.2")
    feature_columns: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, description='a list of column names, e.g. ["age", "income"]; '
                                        "default: every column but the target")
    target_column: str = Field(min_length=1, description='a column name, e.g. "target"')
    categorical_columns: list[str] | Literal["auto"] = Field(
        "auto", description='"auto" (text columns) or a list of feature column names')
    algorithm_params: AlgorithmParams = Field(AlgorithmParams(), description="an object")
    output_path: str | None = Field(None, min_length=1, max_length=4096,
                                    description="a folder path, or null for jobs/<id>/model")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="a whole number in [0, 2**32)")
    shuffle: bool = Field(True, description="true or false")
    optimizer: Optimizer = Field(Optimizer(), description='"adam", "adamw", "sgd", "rmsprop" or an object')
    early_stopping: EarlyStopping | None = Field(None, description="an object, or null")
    learning_rate_scheduler: Schedule | None = Field(None, description=SCHEDULE_HELP)
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = Field(
        "no", description='"no", "bf16", "fp16" (with a loss scaler) or "auto"')
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=4096, description="a whole number in [1, 4096]: micro-batches of batch_size "
                                      "rows per optimizer step")
    checkpoint: CheckpointPolicy = Field(CheckpointPolicy(), description="an object")
    devices: Literal["auto", "cpu", "cuda"] | Annotated[int, Field(ge=0, le=64)] | list[
        Annotated[int, Field(ge=0, le=1023)]] = Field(
        "auto", description='"auto", "cpu", "cuda", "cuda:N" (GPU N), a number of GPUs (0 is the CPU), '
                            "or a list of GPU indices as nvidia-smi numbers them")
    distributed: Distributed | None = Field(
        None, description='null, {"strategy": "ddp", "processes": N} (pytorch) or {"strategy": '
                          '"mirrored", "replicas": N} (tensorflow): N ranks or replicas, each '
                          'batch_size rows a step')
    data: DataOptions = Field(DataOptions(), description="an object")
    limits: Limits = Field(Limits(), description='an object: {"memory_mb": ..., "wall_seconds": ...}')
    priority: int = Field(0, ge=-1000, le=1000, description="a whole number in [-1000, 1000]; higher runs first")
    threads: Literal["auto"] | Annotated[int, Field(ge=1, le=1024)] = Field(
        "auto", description='"auto" or a whole number in [1, 1024] of CPU threads')

    _check_schedule = field_validator("learning_rate_scheduler", mode="before")(_schedule)

    @field_validator("framework", mode="before")
    @classmethod
    def _framework_alias(cls, v: Any) -> Any:
        return FRAMEWORK_ALIASES.get(v.lower(), v) if isinstance(v, str) else v

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_name(cls, v: Any) -> Any:
        return {"name": v.lower()} if isinstance(v, str) else v

    @field_validator("devices", mode="before")
    @classmethod
    def _torch_device_name(cls, v: Any) -> Any:
        """torch's way of naming one GPU, "cuda:N", is the list [N]."""
        if isinstance(v, str) and v.startswith("cuda:") and v[5:].isascii() and v[5:].isdigit():
            return [int(v[5:])]
        return v

    @field_validator("devices")
    @classmethod
    def _gpu_list(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError('an empty list; expected GPU indices such as [0, 1], or "cpu"')
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError(f"GPU indices {v} name a GPU more than once; expected distinct indices")
        return v


def gpu_count_asked(devices: Any) -> int:
    """GPUs a `devices` value names: 0 for the CPU and for "auto" (which takes one only when
    the machine has any), 1 for "cuda", N for a number or a list of N."""
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, int) and not isinstance(devices, bool):
        return devices
    return 1 if devices == "cuda" else 0


def machines(d: Distributed) -> int:
    """Machines a distributed job spans: `nnodes`, or for "mirrored" the length of `workers`."""
    return len(d.workers) if d.workers else d.nnodes


def replicas_per_machine(d: Distributed, gpus: int) -> int:
    """A mirrored job's replicas on each machine. On several machines `replicas` defaults to
    the GPUs the job asks for, and to 1 on the CPU, where MultiWorkerMirroredStrategy puts one
    replica on each machine."""
    if machines(d) > 1 and "replicas" not in d.model_fields_set:
        return max(gpus, 1)
    return d.replicas


def _machine_conflicts(d: Distributed, gpus: int):
    nodes = machines(d)
    if d.workers is not None and d.strategy != "mirrored":
        yield ('distributed.workers is for "mirrored" (TensorFlow); DDP machines meet at '
               'distributed.rdzv_endpoint, "host:port" of node 0')
    if d.strategy == "mirrored" and d.nnodes > 1 and d.workers is None:
        yield (f'"mirrored" on {d.nnodes} machines needs distributed.workers: every machine\'s '
               '"host:port" in node_rank order, e.g. ["10.0.0.1:12345", "10.0.0.2:12345"], the '
               "same list in each machine's job file")
    if d.workers is not None and "nnodes" in d.model_fields_set and d.nnodes != len(d.workers):
        yield (f"distributed.nnodes is {d.nnodes} but distributed.workers names {len(d.workers)} "
               "machines; expected the same number (or leave nnodes out)")
    if d.workers is not None and len(set(d.workers)) != len(d.workers):
        yield f"distributed.workers {d.workers} names an address more than once; expected one per machine"
    if d.strategy == "mirrored" and d.rdzv_endpoint is not None:
        yield ('distributed.rdzv_endpoint is for "ddp"; "mirrored" machines find each other '
               'through distributed.workers')
    if d.strategy == "mirrored" and nodes > 1 and not gpus and replicas_per_machine(d, gpus) != 1:
        yield (f"distributed.replicas is {d.replicas} on the CPU of each of {nodes} machines; "
               "MultiWorkerMirroredStrategy runs one replica on each machine's CPU: expected "
               "replicas 1 (or leave it out), or GPUs in devices")
    if d.strategy == "ddp" and d.nnodes > 1 and d.rdzv_endpoint is None:
        yield ('distributed.nnodes > 1 needs distributed.rdzv_endpoint, "host:port" of node 0, '
               'the same in every node\'s job file')
    if d.node_rank >= nodes:
        yield (f"distributed.node_rank is {d.node_rank} but the job spans {nodes} machine(s); "
               f"expected a node_rank in [0, {nodes - 1}], a different one in each machine's job file")
    for endpoint in [d.rdzv_endpoint] + (d.workers or []):
        if endpoint is not None and not 0 < int(endpoint.rsplit(":", 1)[1]) < 65536:
            yield f'distributed address "{endpoint}" has no valid port; expected 1..65535'


def has_validation(s: JobSpec) -> bool:
    return s.val_data_path is not None or s.validation_split > 0


def _conflicts(s: JobSpec):
    ap = s.algorithm_params
    if ap.early_stopping_patience is not None and s.early_stopping is not None:
        yield ('early stopping is given twice (algorithm_params.early_stopping_patience '
               f'{ap.early_stopping_patience} and early_stopping): which one counts would be a '
               'guess. Expected: one of them; keep early_stopping (its "patience" and more) or '
               'the seed\'s early_stopping_patience')
    if ap.learning_rate_scheduler is not None and s.learning_rate_scheduler is not None:
        yield ('the learning-rate schedule is given twice (algorithm_params.learning_rate_scheduler '
               'and learning_rate_scheduler): which one counts would be a guess. Expected: one of '
               'them; keep the one with the parameters you mean')
    d = s.distributed
    if d is not None and s.framework == "tensorflow" and d.strategy != "mirrored":
        yield ('distributed.strategy "ddp" is PyTorch\'s; a tensorflow job uses '
               '{"strategy": "mirrored", "replicas": N}')
    if d is not None and s.framework == "pytorch" and d.strategy != "ddp":
        yield ('distributed.strategy "mirrored" is TensorFlow\'s; a pytorch job uses '
               '{"strategy": "ddp", "processes": N}')
    if d is not None and d.strategy == "mirrored" and "processes" in d.model_fields_set:
        yield ('distributed.processes is for "ddp"; MirroredStrategy runs in one process: give '
               '"replicas"')
    if d is not None and d.strategy == "ddp" and "replicas" in d.model_fields_set:
        yield 'distributed.replicas is for "mirrored"; DDP gives "processes"'
    gpus = gpu_count_asked(s.devices)
    if d is not None:
        yield from _machine_conflicts(d, gpus)
    if d is None and gpus > 1:
        yield (f"devices asks for {gpus} GPUs, but a job without \"distributed\" trains on one; "
               f'for {gpus} GPUs add "distributed": {{"strategy": "ddp", "processes": {gpus}}} '
               f'(pytorch) or {{"strategy": "mirrored", "replicas": {gpus}}} (tensorflow), or ask '
               "for one GPU")
    if d is not None and gpus:
        per = d.processes if d.strategy == "ddp" else replicas_per_machine(d, gpus)
        word = "distributed.processes" if d.strategy == "ddp" else "distributed.replicas"
        if gpus != per:
            yield (f"devices names {gpus} GPU(s) but {word} is {per}; expected one GPU per "
                   f"{'rank' if d.strategy == 'ddp' else 'replica'}: the same number in both "
                   '(or "devices": "cpu" for CPU ones)')
    if d is not None and d.backend == "nccl" and not gpus:
        yield ('distributed.backend "nccl" runs between GPUs; give devices a number or list of '
               'GPUs, or use "auto" (gloo on the CPU)')
    if s.val_data_path is not None and "validation_split" in s.model_fields_set:
        yield (f'val_data_path and validation_split ({s.validation_split}) are both given: the '
               "validation rows would come from two places. Expected: one of them; give "
               "val_data_path or validation_split, not both")
    if not has_validation(s):  # a val_ metric that was asked for by name cannot be had
        for where, policy in (("early_stopping", s.early_stopping),
                              ("learning_rate_scheduler", s.learning_rate_scheduler or ap.learning_rate_scheduler)):
            if policy is not None and "monitor" in policy.model_fields_set and policy.monitor.startswith("val_"):
                yield (f'{where}.monitor is "{policy.monitor}", but the job has no validation data '
                       "(validation_split 0 and no val_data_path). Expected: a validation_split "
                       'above 0, a val_data_path, or a train_ metric such as "train_loss"')
    o = s.optimizer
    if o.nesterov and o.momentum == 0 and o.name == "sgd":
        yield ("optimizer.nesterov is true but optimizer.momentum is 0: Nesterov's method is a "
               'kind of momentum. Expected: a momentum above 0, e.g. "momentum": 0.9, or '
               '"nesterov": false')
    if s.task != "auto":  # a metric the task never reports is known now, not after the data is read
        for where, policy in (("early_stopping", s.early_stopping),
                              ("learning_rate_scheduler", s.learning_rate_scheduler or ap.learning_rate_scheduler)):
            monitor = getattr(policy, "monitor", None)
            if monitor is None or "monitor" not in policy.model_fields_set:
                continue
            wrong = ("accuracy" in monitor if s.task == "regression"
                     else any(m in monitor for m in ("mae", "rmse", "r2")))
            if wrong:
                fits = ("val_loss, val_mae, val_rmse, val_r2, train_loss, train_mae or train_rmse"
                        if s.task == "regression" else "val_loss, val_accuracy, train_loss or train_accuracy")
                yield (f'{where}.monitor is "{monitor}", which a {s.task} job does not report. '
                       f"Expected: one of {fits}")
    if ap.model_type == "resnet" and not ap.hidden_units:
        yield ('algorithm_params.hidden_units is [], but model_type "resnet" is built of residual '
               "blocks of those widths. Expected: at least one width, e.g. [128, 128], or "
               'model_type "linear"')
    features = s.feature_columns or []
    if len(set(features)) != len(features):
        dupes = sorted({c for c in features if features.count(c) > 1})
        yield (f"feature_columns lists {', '.join(json.dumps(c) for c in dupes)} more than once. "
               "Expected: each column once; remove the repeats")
    if s.target_column in features:
        yield (f'the target column "{s.target_column}" is also in feature_columns: the model would '
               "be given its own label as an input. Expected: the target out of the features; "
               "remove it there")
    if isinstance(s.categorical_columns, list) and s.feature_columns is not None:
        unknown = [c for c in s.categorical_columns if c not in features]
        if unknown:
            yield (f"categorical_columns names {', '.join(json.dumps(c) for c in unknown)}, which "
                   f"feature_columns does not list. Expected: categorical columns among the "
                   "features; add them to feature_columns, or take them out of categorical_columns")


# Which optimiser reads each of the parameters that not all of them take (weight_decay: all).
OPTIMIZER_PARAMS = {"momentum": ("sgd", "rmsprop"), "nesterov": ("sgd",),
                    "betas": ("adam", "adamw"), "eps": ("adam", "adamw", "rmsprop")}


def _either(words: tuple[str, ...]) -> str:
    quoted = [json.dumps(w) for w in words]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def ignored_settings(s: JobSpec) -> list[str]:
    """Settings the job file gives that this job does not use: not errors (switching
    model_type, optimizer.name or data.streaming while leaving the rest as it was is a natural
    edit), but worth a word. They go into run_started's notes, and `epochd submit` prints them."""
    notes, ap, o = [], s.algorithm_params, s.optimizer
    for key, users in OPTIMIZER_PARAMS.items():
        if key in o.model_fields_set and o.name not in users:
            notes.append(f"optimizer.{key} {json.dumps(getattr(o, key))} is ignored: "
                         f'"{o.name}" does not use it (only {_either(users)} do'
                         + (', and Adam\'s momentum is its first beta, "betas"' if key == "momentum"
                            else "") + ")")
    if ap.model_type == "linear":
        used = {"hidden_units": bool(ap.hidden_units), "dropout_rate": ap.dropout_rate > 0,
                "activation": True, "batch_norm": ap.batch_norm}
        for key, matters in used.items():
            if matters and key in ap.model_fields_set:
                notes.append(f"algorithm_params.{key} {json.dumps(getattr(ap, key))} is ignored: "
                             'model_type "linear" has no hidden layers')
    if not s.data.streaming:
        for key in ("chunk_rows", "shuffle_chunks"):
            if key in s.data.model_fields_set:
                notes.append(f"data.{key} {getattr(s.data, key)} is ignored: it sets streaming's "
                             "order and memory, and this job reads its data into memory")
    return notes


# ------------------------------------------------------------------ parsing and error messages

class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _depth(value: Any, depth: int = 0) -> int:
    if depth > MAX_NESTING:
        return depth
    if isinstance(value, dict):
        return max([_depth(v, depth + 1) for v in value.values()], default=depth + 1)
    if isinstance(value, list):
        return max([_depth(v, depth + 1) for v in value], default=depth + 1)
    return depth


def json_error(text: str, e: json.JSONDecodeError) -> str:
    """The syntax error, the line it is on with a caret under the place, and the likely cause
    among what hand-written JSON gets wrong: a comma before a closing brace, a comment, single
    quotes."""
    before, after = text[:e.pos].rstrip(), text[e.pos:].lstrip()
    pos = e.pos
    if before.endswith(",") and after[:1] in ("}", "]"):
        pos = len(before) - 1  # the comma is the mistake, not the brace after it
        cause = "a comma before a closing brace or bracket: JSON allows none; remove that comma"
    elif after.startswith(("//", "/*", "#")):
        cause = "a comment: JSON has none; remove it (a \"name\" or another key can hold a note)"
    elif after.startswith("'"):
        cause = "single quotes: JSON's keys and strings take double quotes"
    else:
        cause = "check for a missing comma, quote or brace"
    line_no = text.count("\n", 0, pos) + 1
    start = text.rfind("\n", 0, pos) + 1
    line = text[start:].split("\n", 1)[0].replace("\t", " ")  # one column each, as the caret counts
    column = pos - start
    if len(line) > 100:  # a long (minified) line: the part around the place
        cut = max(0, column - 50)
        line, column = line[cut:cut + 100], column - cut
    return (f"the file is not valid JSON: {e.msg} (line {line_no}, column {pos - start + 1}):\n"
            f"        {line}\n        {' ' * column}^\n    Expected: one JSON object; {cause}.")


def parse_job_bytes(data: bytes) -> dict:
    """The JSON object a job file holds. Raises BadJobFile saying what is wrong with the bytes."""
    if len(data) > MAX_JOB_FILE_BYTES:
        raise BadJobFile([f"the file is {len(data):,} bytes. Expected: a job file under "
                          f"{MAX_JOB_FILE_BYTES:,} bytes (job files hold settings, not data)."])
    if not data.strip():
        raise BadJobFile(["the file is empty. Expected: a JSON object such as "
                          '{"train_data_path": "data/train.csv", "target_column": "target"}.'])
    if data.startswith(b"\xef\xbb\xbf"):
        raise BadJobFile(["the file starts with a UTF-8 byte-order mark. Expected: plain UTF-8 "
                          "JSON; save it again without the BOM."])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadJobFile([f"the file is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}). "
                          "Expected: a UTF-8 JSON file."]) from None
    try:
        raw = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as e:
        raise BadJobFile([f'the key "{e}" appears twice in one object. Expected: each key once; '
                          "remove one of them."]) from None
    except RecursionError:
        raise BadJobFile(["the JSON is nested too deeply. Expected: a flat job object."]) from None
    except json.JSONDecodeError as e:
        raise BadJobFile([json_error(text, e)]) from None
    except ValueError as e:  # NaN/Infinity, integers past Python's digit limit
        raise BadJobFile([f"the file is not valid JSON: {e}. Expected: one JSON object; check "
                          "for a missing comma, quote or brace, or a NaN/Infinity value."]) from None
    if not isinstance(raw, dict):
        kind = {list: "list [...]", str: "string", bool: "true/false", type(None): "null",
                int: "number", float: "number"}.get(type(raw), type(raw).__name__)
        raise BadJobFile([f"the file holds a JSON {kind}, not an object. Expected: a JSON object "
                          "{...} with the job's settings."])
    if _depth(raw) > MAX_NESTING:
        raise BadJobFile([f"the JSON is nested more than {MAX_NESTING} levels deep. "
                          "Expected: a flat job object."])
    return raw


def validate(raw: dict) -> JobSpec:
    """A JobSpec, or BadJobFile listing every problem (field errors first, then conflicts)."""
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise BadJobFile(explain(e.errors(include_url=False))) from None
    problems = list(_conflicts(spec))
    if problems:
        raise BadJobFile(problems)
    return spec


def explain(errors: list[dict]) -> list[str]:
    """One message per field: what was received, what was expected, and a suggestion."""
    messages, seen = [], set()
    missing = {".".join(map(str, err["loc"])) for err in errors if err["type"] == "missing"}
    for err in errors:
        path, container, info = _locate(err["loc"])
        if (path, err["type"] == "extra_forbidden") in seen:
            continue
        seen.add((path, err["type"] == "extra_forbidden"))
        messages.append(_message(err, path, container, info, missing))
    return messages


def _message(err: dict, path: str, container: type | None, info, missing: set[str] = frozenset()) -> str:
    received = _show(err.get("input"))
    expected = info.description if info is not None and info.description else None
    if err["type"] == "extra_forbidden":
        key = path.rsplit(".", 1)[-1]
        valid = list(container.model_fields) if container else []
        parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
        # "data_path" beside a missing "train_data_path" means that one, though "val_data_path"
        # is nearer by letters: a required key the file lacks is the likelier meaning
        wanted = [k for k in valid if parent + k in missing]
        near = (difflib.get_close_matches(key, wanted, n=1, cutoff=0.6)
                or difflib.get_close_matches(key, valid, n=1, cutoff=0.6))
        hint = f' Did you mean "{near[0]}"?' if near else ""
        return f'unknown key "{path}".{hint} Valid keys here: {", ".join(valid)}.'
    if err["type"] == "missing":
        return f'"{path}" is required but missing. Expected: {expected or "a value"}.'
    if err["type"] == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag")
        near = difflib.get_close_matches(str(tag), list(SCHEDULES), n=1, cutoff=0.5)
        hint = f' Did you mean "{near[0]}"?' if near else ""
        return (f'"{path}" names an unknown schedule. Received: {_show(tag)}. '
                f'Expected: one of "{", ".join(SCHEDULES)}".{hint}')
    problem = err["msg"].removeprefix("Value error, ")
    where = f'"{path}"' if path else "the job"
    tail = f" Expected: {expected}." if expected else ""
    return f"{where}: {problem}. Received: {received}.{tail}"


def _show(value: Any) -> str:
    # the stdlib encoder: orjson refuses integers past 64 bits, and users do type those
    text = json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= 120 else text[:117] + "..."


def _locate(loc: tuple) -> tuple[str, type | None, Any]:
    """Walk an error location through the models: (dotted path, model holding it, FieldInfo)."""
    model: Any = JobSpec
    parts: list[str] = []
    info = None
    for part in loc:
        if isinstance(part, int):
            parts[-1:] = [f"{parts[-1]}[{part}]"] if parts else [f"[{part}]"]
            continue
        if isinstance(model, dict) and part in model:          # a discriminated union's tag
            model = model[part]
            continue
        if not (isinstance(model, type) and part in model.model_fields):
            if isinstance(model, type) and not parts_is_union_label(part):
                parts.append(part)                             # an unknown key: model holds it
            return ".".join(parts), model if isinstance(model, type) else None, info
        parts.append(part)
        info = model.model_fields[part]
        model = _nested(info.annotation)
    return ".".join(parts), model if isinstance(model, type) else None, info


def parts_is_union_label(part: str) -> bool:
    """pydantic labels union branches like "int" or "literal['auto']" in error locations."""
    return part in {"int", "str", "float", "bool", "list[int]", "list[str]", "none"} or \
        part.startswith(("literal[", "list[", "function-"))


def _nested(annotation: Any) -> Any:
    """The model (or {tag: model} for a discriminated union) an annotation leads to."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [a for a in _flatten(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    if len(models) == 1:
        return models[0]
    if models:
        return {m.model_fields["name"].annotation.__args__[0]: m for m in models}
    return None


def _flatten(annotation: Any) -> list:
    out = []
    for arg in typing.get_args(annotation) or [annotation]:
        out.extend(_flatten(arg) if typing.get_args(arg) else [arg])
    return out


# ------------------------------------------------------------------ normalisation

def normalise(spec: JobSpec, *, job_id: str, base_dir: Path, spool_root: Path,
              allow_roots: list[Path]) -> dict:
    """The canonical spec recorded in `job_accepted`: defaults filled, paths absolute and allowed."""
    out = spec.model_dump(mode="json")
    ap = out["algorithm_params"]
    out["name"] = out["name"] or job_id
    if out["early_stopping"] is None and ap["early_stopping_patience"] is not None:
        out["early_stopping"] = {**EarlyStopping().model_dump(), "patience": ap["early_stopping_patience"]}
    out["learning_rate_scheduler"] = (out["learning_rate_scheduler"] or ap["learning_rate_scheduler"]
                                      or NoSchedule(name="none").model_dump())
    ap["early_stopping_patience"] = ap["learning_rate_scheduler"] = None
    if not has_validation(spec):
        # without validation data the policies watch the training loss unless told otherwise
        # (a val_ metric asked for by name is refused in _conflicts)
        for policy in (out["early_stopping"], out["learning_rate_scheduler"]):
            if policy and policy.get("monitor") == "val_loss":  # the default
                policy["monitor"] = "train_loss"
    opt = out["optimizer"]
    if opt["weight_decay"] is None:
        opt["weight_decay"] = 0.01 if opt["name"] == "adamw" else 0.0
    if out["val_data_path"] is not None:
        out["validation_split"] = 0.0
    if "delimiter" not in spec.data.model_fields_set and tab_separated_name(spec.train_data_path):
        out["data"]["delimiter"] = "\t"  # a .tsv file says its delimiter in its name
    if spec.distributed is not None and spec.distributed.strategy == "mirrored":
        d = out["distributed"]  # what the worker reads: the machines and each one's replicas
        d["nnodes"] = machines(spec.distributed)
        d["replicas"] = replicas_per_machine(spec.distributed, gpu_count_asked(spec.devices))
    errors = []
    for key, writes in (("train_data_path", False), ("val_data_path", False), ("output_path", True)):
        if out[key] is not None:
            out[key], problem = _resolve(key, out[key], base_dir, spool_root, allow_roots, writes)
            errors += [problem] if problem else []
    if errors:
        raise BadJobFile(errors)
    return out


def tab_separated_name(path: str) -> bool:
    """Whether a file name says tab-separated: .tsv or .tab, compressed or not (t.tsv.gz)."""
    suffixes = [x.lower() for x in Path(path).suffixes]
    # engines.data.COMPRESSED and .zip: named here, since the daemon never imports pandas
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zip"):
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in (".tsv", ".tab")


def _resolve(key: str, value: str, base_dir: Path, spool_root: Path, roots: list[Path],
             writes: bool) -> tuple[str, str | None]:
    if "\x00" in value:
        return value, f'"{key}" contains a NUL byte. Received: {_show(value)}. Expected: a path.'
    path = Path(os.path.abspath(Path(base_dir) / Path(value).expanduser()))
    real = Path(os.path.realpath(path))  # follows symlinks: where the bytes really are
    if writes and _inside(real, Path(os.path.realpath(spool_root))):
        return str(path), (f'"{key}" points inside the spool. Received: {_show(value)}. '
                           "Expected: a folder outside it, or null for the job's own model folder.")
    if roots and not path_allowed(path, roots):
        shown = ", ".join(str(r) for r in roots)
        return str(path), (f'"{key}" is outside the folders this daemon may use. Received: '
                           f"{_show(value)} (resolves to {real}). Expected: a path under {shown}; "
                           "move the file there or ask the admin to add an --allow-root.")
    return str(path), None


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def path_allowed(path: Path, roots: list[Path]) -> bool:
    """Whether `path`, with every symlink followed, lies under one of `roots`."""
    real = Path(os.path.realpath(path))
    return any(_inside(real, Path(os.path.realpath(r))) for r in roots)


def spec_sha256(normalised: dict) -> str:
    return hashlib.sha256(orjson.dumps(normalised, option=orjson.OPT_SORT_KEYS)).hexdigest()


def example_job() -> dict:
    """The seed's request body, verbatim: a valid job file."""
    return {
        "name": "deep learning model training",
        "algorithm_type": "deep_learning",
        "epochs": 100,
        "batch_size": 32,
        "learning_rate": 0.001,
        "train_data_path": "/data/train.csv",
        "feature_columns": ["feature1", "feature2", "feature3"],
        "target_column": "target",
        "algorithm_params": {
            "model_type": "mlp",
            "hidden_units": [128, 64, 32],
            "dropout_rate": 0.2,
            "early_stopping_patience": 10,
            "learning_rate_scheduler": "step",
        },
        "output_path": "/models/deep_learning_model",
    }
