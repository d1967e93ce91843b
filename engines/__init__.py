"""Training engines: one small interface, one module per framework.

The worker owns the epoch loop and reaches a framework only through `load_engine(name)`. An
engine receives the normalised job spec and the prepared data, and returns plain numbers; it
never touches the spool, the log or the events. Frameworks are imported only when an engine is
loaded, so the daemon process (which never calls this) never imports torch or tensorflow.
"""
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from daemon.errors import EngineUnavailable
from daemon.spec import gpu_count_asked
from daemon.sysinfo import assigned_gpus, physical_index

from .data import Prepared

ENGINE_MODULES = {"pytorch": "engines.torch_engine", "tensorflow": "engines.tf_engine"}
INSTALL_HINTS = {"pytorch": "pip install torch", "tensorflow": "pip install 'epochd[tensorflow]'"}


class Engine(ABC):
    """One job's model, optimiser and data on one device, driven a few steps at a time."""

    framework: ClassVar[str]
    weights_file: ClassVar[str]      # final weights, under output_path
    best_file: ClassVar[str]         # best weights, under output_path
    checkpoint_suffix: ClassVar[str]
    steps_per_epoch: int
    devices: list[str]               # what run_started records, e.g. ["cpu"], ["cuda:0 (NVIDIA H200)"]
    gpu_index: int | None            # the visible GPU it trains on, for NVML readings; None on CPU
    threads: int                     # CPU threads it uses

    @abstractmethod
    def __init__(self, spec: dict, data: Prepared, cpu_share: int):
        """Build the model and optimiser on the device `spec["devices"]` asks for, seeded by
        `spec["seed"]`. `cpu_share` is how many cores this job may use. Raises
        DeviceUnavailable when the job asks for a GPU the machine lacks."""

    @abstractmethod
    def _tensors(self, x: np.ndarray, y: np.ndarray):
        """Encoded rows and their targets as the framework's tensors on the engine's device."""

    def place_rows(self, spec: dict, data: Prepared) -> None:
        """The training and validation rows as the engine's tensors (`_tensors`), or, when
        streaming, the sources that bring them from disk a window at a time (engines/stream.py)."""
        self.stream = data.stream.epoch_rows(spec["seed"], spec["shuffle"]) if data.stream else None
        self.val_rows = data.stream.val if data.stream else None
        if self.stream is None:
            self.x, self.y = self._tensors(data.x_train, data.y_train)
            self.x_val, self.y_val = (self._tensors(data.x_val, data.y_val)
                                      if data.x_val is not None else (None, None))
        else:
            self.x = self.y = self.x_val = self.y_val = None
        self.n = data.n_train

    def stream_calls(self, lrs: Sequence[float]) -> list[Sequence[float]]:
        """`lrs` cut into engine calls: streaming, at most a window's rows each (memory holds
        one window); in memory, one call."""
        if self.stream is None:
            return [lrs]
        per_call = max(1, self.stream.window_rows // self.batch_size)
        return [lrs[a:a + per_call] for a in range(0, len(lrs), per_call)]

    @abstractmethod
    def versions(self) -> dict[str, str]: ...

    @abstractmethod
    def start_epoch(self, epoch: int, step: int) -> None:
        """Lay out epoch `epoch`'s batches (order from `data.epoch_order`); continue at `step`.
        Step 0 resets the epoch's running sums; a later step keeps those a checkpoint restored."""

    @abstractmethod
    def train_steps(self, lrs: Sequence[float]) -> None:
        """Run len(lrs) optimiser steps from the current position, step i at rate lrs[i]."""

    @abstractmethod
    def train_metrics(self) -> dict[str, float]:
        """Running means of the current epoch so far: train_loss, train_accuracy | train_mae..."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """val_loss, val_accuracy | val_mae, val_rmse, val_r2; {} without validation data."""

    @abstractmethod
    def save_checkpoint(self, path: Path) -> None:
        """Everything needed to continue bit for bit: weights, optimiser, RNG, epoch sums."""

    @abstractmethod
    def load_checkpoint(self, path: Path) -> tuple[int, int]:
        """Restore a checkpoint; return its (epoch, step). Never unpickles arbitrary objects."""

    @abstractmethod
    def save_weights(self, path: Path) -> None: ...

    @abstractmethod
    def load_weights(self, path: Path) -> None: ...

    def export(self, folder: Path) -> dict[str, Path]:
        """Framework-native extras written beside the weights (e.g. a .keras file)."""
        return {}

    @classmethod
    @abstractmethod
    def predictor(cls, folder: Path, arch: dict, weights: Path) -> Callable[[np.ndarray], np.ndarray]:
        """A function from encoded features to probabilities or standardised values, using the
        network model.json describes and the weights file given."""


def load_engine(name: str) -> type[Engine]:
    """The engine class of a framework, importing the framework (only here, only in a worker)."""
    if name not in ENGINE_MODULES:
        raise ValueError(f"no engine for framework {name!r}; available: {', '.join(ENGINE_MODULES)}")
    try:
        return importlib.import_module(ENGINE_MODULES[name]).ENGINE
    except ImportError as e:
        missing = e.name or str(e)
        raise EngineUnavailable(
            f'framework "{name}" needs {missing}, which does not import where the worker runs '
            f"({type(e).__name__}: {e}). Expected: the framework installed in epochd's "
            f"environment ({INSTALL_HINTS[name]}), or a job with another framework.") from e


def architecture(spec: dict, data: Prepared) -> dict:
    """model.json: what any engine needs to rebuild the network, and what the outputs mean."""
    ap = spec["algorithm_params"]
    return {"format": "epochd-model", "version": 1, "framework": spec["framework"],
            "task": data.task, "model_type": ap["model_type"], "input_dim": data.input_dim,
            "output_dim": data.n_outputs, "hidden_units": ap["hidden_units"],
            "dropout_rate": ap["dropout_rate"], "activation": ap["activation"],
            "batch_norm": ap["batch_norm"]}


def parameter_count(arch: dict) -> int:
    """How many numbers the network of `arch` (model.json) holds, as both engines build it."""
    d_in, d_out, hidden, bn = arch["input_dim"], arch["output_dim"], arch["hidden_units"], arch["batch_norm"]
    count = 0
    if arch["model_type"] == "mlp":
        for width in hidden:
            count += d_in * width + width + (2 * width if bn else 0)
            d_in = width
    elif arch["model_type"] == "resnet" and hidden:
        width = hidden[0]
        count += d_in * width + width
        for inner in hidden:  # norm, linear(width, inner), linear(inner, width)
            count += (2 * width if bn else 0) + width * inner + inner + inner * width + width
        d_in = width
    return count + d_in * d_out + d_out


def training_bytes(spec: dict, arch: dict) -> int:
    """Memory the parameters take while training, float32: the weights, their gradients, the
    optimizer's state (Adam keeps two numbers a weight, RMSprop one, momentum one more) and one
    copy (the best weights, or a checkpoint being written). Activations come on top."""
    opt = spec["optimizer"]
    states = {"adam": 2, "adamw": 2, "rmsprop": 1, "sgd": 0}[opt["name"]]
    states += 1 if opt["name"] in ("sgd", "rmsprop") and opt.get("momentum") else 0
    return parameter_count(arch) * 4 * (3 + states)


def job_threads(spec: dict, input_dim: int, cpu_share: int) -> int:
    """The job's `threads`; for "auto", one thread while steps are small (a second never helped
    up to batch 1024 with the seed's MLP), up to 8 of the job's cores once a step's arithmetic
    dwarfs the per-step overhead."""
    if spec["threads"] != "auto":
        return spec["threads"]
    widths = [input_dim] + spec["algorithm_params"]["hidden_units"]
    macs = spec["batch_size"] * sum(a * b for a, b in zip(widths, widths[1:]))
    if macs < 50_000_000:
        return 1
    return max(1, min(8, cpu_share))


def gpu_plan(devices, world: int, local_rank: int) -> int | None:
    """The CUDA index (in this process's numbering) a run or rank trains on, or None for the
    CPU. The daemon hands a worker exactly the GPUs its job asked for (CUDA_VISIBLE_DEVICES),
    so rank k takes the k-th; without that (an engine used on its own) a list names them."""
    if world > 1 and not gpu_count_asked(devices):
        return None  # distributed "auto": CPU ranks
    if devices in ("cpu", 0):
        return None
    if isinstance(devices, list) and not assigned_gpus():
        return devices[local_rank]
    return local_rank


def gpu_name(index: int, name: str) -> str:
    """What run_started records for a GPU: nvidia-smi's number and the model's name."""
    return f"cuda:{physical_index(index)} ({name})"
