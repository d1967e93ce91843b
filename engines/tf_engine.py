"""The TensorFlow engine (TensorFlow 2, Keras 3 layers, a custom training step).

Same contract as the PyTorch engine, and the same recipe for speed: the data is one tensor on the
device, each epoch gathers it once in its order and batches are slices of that. One engine call
is one `tf.function` whose `tf.while_loop` runs all the steps it is given, as Keras'
`steps_per_execution` does, so the worker still regains control every ~0.2 s (pause, progress,
timed checkpoints) while Python is out of the per-step path. Each step writes its loss and its
samples' hits into per-epoch buffer variables, so the epoch's running metrics do not depend on
how the steps were split into calls (exact resume).

Determinism: `keras.utils.set_random_seed(seed)` and `enable_op_determinism`; the dropout layers'
seed-generator states are model variables, so a checkpoint carries them.

fp16 (`mixed_precision`): float16 layers and Keras' LossScaleOptimizer; the gradients are taken
of the scaled loss and unscaled by the optimizer, which skips a step that overflowed.

Data parallelism (`distributed.strategy` "mirrored"): MirroredStrategy over the job's GPUs, or
logical CPU devices; the model and optimiser are mirrored variables, each step runs on every
replica through `strategy.run` with its share of the step's rows, and the optimiser sums their
gradients. On several machines (`distributed.workers`) the same step runs under
MultiWorkerMirroredStrategy, and `Collectives` carries what the machines' workers agree on.

Files, none of them loaded by unpickling or by `keras.models.load_model`:
- checkpoints: one HDF5 file (h5py) holding every model and optimiser variable, the epoch
  buffers and a JSON header (format, epoch, step, learning rate, the variables' paths and shapes,
  checked before anything is assigned);
- final and best weights: Keras' own `.weights.h5` (`model.load_weights` on the network built from
  model.json);
- `model.keras`: a whole-model export for users who want `keras.models.load_model` themselves.

The framework's weight decay follows the PyTorch engine's meaning: "adam", "sgd" and "rmsprop" add
weight_decay * w to the gradient (L2), "adamw" decays the weights directly (decoupled).
"""
import errno
import json
import math
import os
import signal
import socket
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before the import: no banner per worker

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from daemon.errors import CheckpointInvalid, DeviceUnavailable, PortInUse  # noqa: E402

from . import Engine, architecture, gpu_name, gpu_plan, job_threads  # noqa: E402
from .data import Prepared, epoch_order, regression_scale  # noqa: E402

# Before the first op: never map a whole GPU that another job may need.
for _gpu in tf.config.list_physical_devices("GPU"):
    try:
        tf.config.experimental.set_memory_growth(_gpu, True)
    except RuntimeError:  # already initialised (a second engine in one process, e.g. tests)
        pass

CHECKPOINT_FORMAT = "epochd-tf-1"
EVAL_BATCH = 65536
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "tanh": "tanh", "sigmoid": "sigmoid",
               "elu": "elu", "silu": "silu", "selu": "selu"}


def _activation(name: str, label: str) -> keras.layers.Layer:
    if name == "leaky_relu":  # PyTorch's slope, not Keras' 0.2
        return keras.layers.LeakyReLU(negative_slope=0.01, name=label)
    return keras.layers.Activation(ACTIVATIONS[name], name=label)


def build_model(arch: dict, dtype: str = "float32") -> keras.Model:
    """The network model.json describes (`mlp`, `linear`, `resnet`), with fixed layer names so
    weight files match whichever process builds it. The output layer always computes in float32."""
    d_in, d_out, hidden = arch["input_dim"], arch["output_dim"], arch["hidden_units"]
    p, bn, act = arch["dropout_rate"], arch["batch_norm"], arch["activation"]
    L = keras.layers

    def norm(name):  # PyTorch's BatchNorm1d defaults: momentum 0.1 (Keras 0.9), eps 1e-5
        return L.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name, dtype=dtype)

    inputs = keras.Input((d_in,), name="features")
    x = inputs
    if arch["model_type"] == "mlp":
        for i, width in enumerate(hidden):
            x = L.Dense(width, name=f"dense_{i}", dtype=dtype)(x)
            if bn:
                x = norm(f"norm_{i}")(x)
            x = _activation(act, f"act_{i}")(x)
            if p > 0:
                x = L.Dropout(p, name=f"dropout_{i}", dtype=dtype)(x)
    elif arch["model_type"] == "resnet" and hidden:
        width = hidden[0]
        x = L.Dense(width, name="stem", dtype=dtype)(x)
        for i, inner in enumerate(hidden):
            h = norm(f"block_{i}_norm")(x) if bn else x
            h = L.Dense(inner, name=f"block_{i}_in", dtype=dtype)(h)
            h = _activation(act, f"block_{i}_act")(h)
            h = L.Dropout(p, name=f"block_{i}_dropout", dtype=dtype)(h)
            h = L.Dense(width, name=f"block_{i}_out", dtype=dtype)(h)
            x = L.Add(name=f"block_{i}_add")([x, h])
        x = _activation(act, "act_out")(x)
    outputs = L.Dense(d_out, name="output", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="epochd")


def make_optimizer(opt: dict, lr: float) -> tuple[keras.optimizers.Optimizer, float]:
    """The optimiser, and the L2 coefficient the step adds to gradients (0 for decoupled decay)."""
    wd = opt["weight_decay"]
    match opt["name"]:
        case "adam":
            return keras.optimizers.Adam(lr, beta_1=opt["betas"][0], beta_2=opt["betas"][1],
                                         epsilon=opt["eps"]), wd
        case "adamw":
            return keras.optimizers.AdamW(lr, weight_decay=wd, beta_1=opt["betas"][0],
                                          beta_2=opt["betas"][1], epsilon=opt["eps"]), 0.0
        case "sgd":
            return keras.optimizers.SGD(lr, momentum=opt["momentum"], nesterov=opt["nesterov"]), wd
        case "rmsprop":  # PyTorch's defaults: alpha (rho) 0.99
            return keras.optimizers.RMSprop(lr, rho=0.99, momentum=opt["momentum"],
                                            epsilon=opt["eps"]), wd
    raise ValueError(f"unknown optimizer {opt['name']!r}")


def pick_device(devices, indices: list[int] | None) -> str:
    """Make only the job's GPUs visible to TensorFlow (before its runtime starts) and name the
    first. `indices` (from `gpu_plan`): the GPUs to train on, one per replica; None for the
    CPU. "auto" falls back to the CPU when none is visible; a GPU asked for must exist."""
    gpus = tf.config.list_physical_devices("GPU")
    if indices is None or (devices == "auto" and not gpus):
        _show_gpus([])
        return "/CPU:0"
    if not gpus:
        raise DeviceUnavailable(f"the job asks for a GPU (devices: {devices!r}) but none is visible "
                                'to the worker. Expected: a machine with a CUDA GPU and a TensorFlow '
                                'build with GPU support; or set "devices": "auto" to fall back to the CPU.')
    if max(indices) >= len(gpus):
        raise DeviceUnavailable(f"the job asks for GPU(s) {indices} but {len(gpus)} are visible. "
                                'Expected: indices below that, or "auto".')
    _show_gpus([gpus[i] for i in indices])
    return "/GPU:0"


def _job_device(spec: dict, replicas: int) -> str:
    """The job's first device, with only its GPUs visible (one per replica of this machine)."""
    on_gpus = gpu_plan(spec["devices"], replicas, 0) is not None
    return pick_device(spec["devices"], [gpu_plan(spec["devices"], replicas, k)
                                         for k in range(replicas)] if on_gpus else None)


def _show_gpus(gpus: list) -> None:
    try:
        tf.config.set_visible_devices(gpus, "GPU")
    except RuntimeError:  # the runtime already started in this process (tests); keep its choice
        pass


class TensorFlowEngine(Engine):
    framework = "tensorflow"
    weights_file = "model.weights.h5"
    best_file = "best.weights.h5"
    checkpoint_suffix = ".h5"

    def __init__(self, spec: dict, data: Prepared, cpu_share: int):
        dist = spec.get("distributed") or {}
        self.replicas = dist.get("replicas", 1) if dist.get("strategy") == "mirrored" else 1
        # MirroredStrategy over the job's GPUs (NCCL all-reduce), or on the CPU one logical
        # device per replica, set before the runtime starts (a fresh worker process; a test
        # process that already started one cannot); on several machines, MultiWorkerMirrored
        self.device = _job_device(spec, self.replicas)
        self.strategy = None
        if dist.get("strategy") == "mirrored" and dist.get("nnodes", 1) > 1:
            self.strategy = multi_worker_strategy(spec)
        elif self.replicas > 1:
            self.strategy = (_mirrored_gpus(self.replicas) if self.device.startswith("/GPU")
                             else _mirrored_cpus(self.replicas))
        in_sync = self.strategy.num_replicas_in_sync if self.strategy else 1  # on every machine
        self.threads = job_threads(spec, data.input_dim, cpu_share)
        try:  # only before the runtime starts: a second engine in one process keeps the first's
            tf.config.threading.set_intra_op_parallelism_threads(self.threads)
            tf.config.threading.set_inter_op_parallelism_threads(
                max(self.replicas, 1 if self.threads == 1 else 2))  # replicas run side by side
        except RuntimeError:
            pass
        self.gpu_index = None
        self.devices = ["cpu"] * self.replicas
        if self.device.startswith("/GPU"):
            self.gpu_index = 0
            self.devices = [gpu_name(i, tf.config.experimental.get_device_details(gpu).get(
                "device_name", "GPU")) for i, gpu in enumerate(tf.config.get_visible_devices("GPU"))]
        tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(spec["seed"])  # weights' init, then the dropout seeds
        self.spec, self.task = spec, data.task
        # a step is one optimizer update: with accumulation, over `accumulation` micro-batches
        self.micro_batch = spec["batch_size"]
        self.accumulation = spec["gradient_accumulation_steps"]
        self.batch_size = self.micro_batch * self.accumulation * in_sync  # rows per step
        self.y_scale = regression_scale(data.preprocess)
        self.binary = data.task == "classification" and data.n_outputs == 1
        self.multiclass = data.task == "classification" and not self.binary
        self.lr = spec["learning_rate"]
        # "auto": bf16 on a GPU, full precision on the CPU (autocast slows small networks there)
        bf16 = spec["mixed_precision"] == "bf16" or (spec["mixed_precision"] == "auto" and self.gpu_index is not None)
        # fp16: float16 layers, and the loss scaled up so small gradients survive; the scale
        # adapts (Keras' LossScaleOptimizer: halves on an overflow, whose step is skipped,
        # doubles after 2,000 clean steps) and, an optimizer variable, is in every checkpoint
        self.fp16 = spec["mixed_precision"] == "fp16"
        dtype = "mixed_bfloat16" if bf16 else "mixed_float16" if self.fp16 else "float32"
        with tf.device(self.device):
            with self.strategy.scope() if self.strategy else nullcontext():  # mirrored variables
                self.model = build_model(architecture(spec, data), dtype)
                self.optimizer, self.l2 = make_optimizer(spec["optimizer"], self.lr)
                if self.fp16:
                    self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
                self.optimizer.build(self.model.trainable_variables)
            self.place_rows(spec, data)
            self.steps_per_epoch = math.ceil(self.n / self.batch_size)
            self.step_losses = tf.Variable(tf.zeros([self.steps_per_epoch]), trainable=False)
            # each sample's hit; streaming keeps each step's sum instead (nothing grows with rows)
            self.sample_hits = tf.Variable(
                tf.zeros([self.steps_per_epoch if self.stream else self.n]), trainable=False)
        sizes = np.full(self.steps_per_epoch, float(self.batch_size))
        sizes[-1] = self.n - self.batch_size * (self.steps_per_epoch - 1)
        self.step_sizes = sizes
        self.epoch = self.step = 0
        self.xs = self.ys = None
        y_spec = (tf.TensorSpec([None], tf.int64) if self.multiclass
                  else tf.TensorSpec([None, 1], tf.float32))
        loop = self._train_loop if self.strategy is None else self._train_loop_mirrored
        self._train = tf.function(loop, input_signature=[
            tf.TensorSpec([None, data.input_dim], tf.float32), y_spec,
            tf.TensorSpec([], tf.int32), tf.TensorSpec([None], tf.float32), tf.TensorSpec([], tf.int32)])
        self._forward = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True)

    def _tensors(self, x: np.ndarray, y: np.ndarray) -> tuple[tf.Tensor, tf.Tensor]:
        xt = tf.constant(np.asarray(x, np.float32))
        if self.multiclass:
            return xt, tf.constant(np.asarray(y, np.int64))
        return xt, tf.constant(np.asarray(y, np.float32).reshape(-1, 1))

    def versions(self) -> dict[str, str]:
        return {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__}

    def start_epoch(self, epoch: int, step: int) -> None:
        if self.stream is None:
            order = tf.constant(epoch_order(self.spec["seed"], epoch, self.n, self.spec["shuffle"]))
            with tf.device(self.device):
                self.xs, self.ys = tf.gather(self.x, order), tf.gather(self.y, order)
        if step == 0:
            self._clear_epoch_buffers()
        self.epoch, self.step = epoch, step

    def _clear_epoch_buffers(self) -> None:
        self.step_losses.assign(tf.zeros_like(self.step_losses))
        self.sample_hits.assign(tf.zeros_like(self.sample_hits))

    # ---------------------------------------------------------------- the step

    def _loss(self, out, y):
        out = tf.cast(out, tf.float32)
        if self.task == "regression":
            return tf.reduce_mean(tf.square(out - y))
        if self.binary:
            return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=out))
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out))

    def _hits(self, out, y):
        """Per sample: 1.0 if predicted right (classification), else |error| (regression)."""
        out = tf.cast(out, tf.float32)
        if self.task == "regression":
            return tf.reshape(tf.abs(out - y), [-1])
        if self.binary:
            return tf.cast(tf.reshape(tf.equal(out > 0, y > 0.5), [-1]), tf.float32)
        return tf.cast(tf.equal(tf.argmax(out, 1), y), tf.float32)

    def _train_loop(self, xs, ys, first, lrs, row0):
        """Steps first .. first+len(lrs)-1 of the epoch, in one graph call. `xs` holds the
        epoch's rows from `row0` on (all of them, or a streaming call's span)."""
        model, opt, bs, l2 = self.model, self.optimizer, self.batch_size, self.l2
        variables = model.trainable_variables
        for i in tf.range(tf.shape(lrs)[0]):
            step = first + i
            start = step * bs
            xb, yb = xs[start - row0:start - row0 + bs], ys[start - row0:start - row0 + bs]
            opt.learning_rate.assign(lrs[i])
            if self.accumulation > 1:
                grads, loss = self._accumulated_grads(xb, yb, step, start)
            else:
                with tf.GradientTape() as tape:
                    out = model(xb, training=True)
                    loss = self._loss(out, yb)
                    scaled = self._scaled(loss)
                grads = tape.gradient(scaled, variables)
                self._record_hits(step, start, self._hits(out, yb))
            if l2:
                grads = [g + (l2 * self._scale()) * v for g, v in zip(grads, variables)]
            opt.apply(grads, variables)
            self.step_losses[step].assign(loss)

    def _scaled(self, loss):
        """What the gradients are taken of: the loss, scaled up under fp16 (the optimizer
        divides the gradients by the same scale before it applies them)."""
        return self.optimizer.scale_loss(loss) if self.fp16 else loss

    def _scale(self):
        """The loss scale the gradients carry (1 without fp16): L2 terms join them scaled."""
        return tf.cast(self.optimizer.dynamic_scale, tf.float32) if self.fp16 else 1.0

    def _record_hits(self, step, start, hits):
        """A step's (or a micro-batch's) hits: per sample at `start`, or into the step's sum."""
        if self.stream is not None:
            self.sample_hits[step].assign(self.sample_hits[step] + tf.reduce_sum(hits))
        else:
            self.sample_hits[start:start + tf.shape(hits)[0]].assign(hits)

    def _losses(self, out, y):
        """Per-sample losses (their mean is `_loss`)."""
        out = tf.cast(out, tf.float32)
        if self.task == "regression":
            return tf.reshape(tf.square(out - y), [-1])
        if self.binary:
            return tf.reshape(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=out), [-1])
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out)

    def _train_loop_mirrored(self, xs, ys, first, lrs, row0):
        """The same steps with MirroredStrategy: a step's rows are split between the replicas
        in replica order (as the DDP ranks split them), each replica's loss is its rows' summed
        loss over the step's rows, and the optimizer sums the replicas' gradients: the update
        of the whole step's mean loss, as one device would make it."""
        bs, strategy = self.batch_size, self.strategy
        for i in tf.range(tf.shape(lrs)[0]):
            step = first + i
            start = step * bs
            rows = tf.minimum(bs, self.n - start)
            self.optimizer.learning_rate.assign(lrs[i])
            losses, hits = strategy.run(self._replica_step, args=(xs, ys, start, rows, row0))
            self.step_losses[step].assign(strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None))
            if self.stream is not None:  # the step's sum of hits, over the replicas
                self.sample_hits[step].assign(strategy.reduce(tf.distribute.ReduceOp.SUM, hits, axis=None))

    def _replica_step(self, xs, ys, start, rows, row0):
        ctx = tf.distribute.get_replica_context()
        r, w = ctx.replica_id_in_sync_group, ctx.num_replicas_in_sync
        base, extra = rows // w, rows % w
        mine = base + tf.cast(r < extra, tf.int32)
        first = start + r * base + tf.minimum(r, extra)
        variables = self.model.trainable_variables
        micro = self.micro_batch
        total = hit_sum = tf.zeros([], tf.float32)
        grads = [tf.zeros_like(v) for v in variables]
        denominator = tf.cast(rows, tf.float32)
        for j in tf.range((mine + micro - 1) // micro):  # micro-batches of this replica's rows
            a = first + j * micro
            b = tf.minimum(a + micro, first + mine)
            xm, ym = xs[a - row0:b - row0], ys[a - row0:b - row0]
            with tf.GradientTape() as tape:
                out = self.model(xm, training=True)
                loss = tf.reduce_sum(self._losses(out, ym)) / denominator
                scaled = self._scaled(loss)
            grads = [s + g for s, g in zip(grads, tape.gradient(scaled, variables))]
            total += loss
            hits = self._hits(out, ym)
            if self.stream is None:
                self.sample_hits[a:b].assign(hits)
            else:  # summed over the replicas by the caller
                hit_sum += tf.reduce_sum(hits)
        if self.l2:  # summed over the replicas: each adds its share
            grads = [g + (self.l2 * self._scale() / tf.cast(w, tf.float32)) * v for g, v in zip(grads, variables)]
        self.optimizer.apply(grads, variables)
        return total, hit_sum

    def _accumulated_grads(self, xb, yb, step, start):
        """The step's gradient from micro-batches taken one after the other, each weighted by
        its share of the rows: the whole batch's mean-loss gradient (a short last batch
        included), with one micro-batch's activations alive at a time."""
        variables = self.model.trainable_variables
        rows, micro = tf.shape(xb)[0], self.micro_batch
        total = tf.zeros_like(self.step_losses[0])
        grads = [tf.zeros_like(v) for v in variables]
        for j in tf.range((rows + micro - 1) // micro):
            a = j * micro
            xm, ym = xb[a:a + micro], yb[a:a + micro]
            share = tf.cast(tf.shape(xm)[0], tf.float32) / tf.cast(rows, tf.float32)
            with tf.GradientTape() as tape:
                out = self.model(xm, training=True)
                loss = self._loss(out, ym)
                scaled = self._scaled(loss)
            grads = [s + g * share for s, g in zip(grads, tape.gradient(scaled, variables))]
            total += loss * share
            self._record_hits(step, start + a, self._hits(out, ym))
        return grads, total

    def train_steps(self, lrs: Sequence[float]) -> None:
        if not lrs:
            return
        xs, ys, row0 = self.xs, self.ys, 0
        calls = self.stream_calls(lrs)
        if len(calls) > 1:
            for call in calls:
                self.train_steps(call)
            return
        if self.stream is not None:  # this call's rows, from the window(s) they lie in
            row0 = self.step * self.batch_size
            with tf.device(self.device):
                xs, ys = self._tensors(*self.stream.span(self.epoch, row0, row0 + len(lrs) * self.batch_size))
        with tf.device(self.device):
            self._train(xs, ys, tf.constant(self.step, tf.int32), tf.constant(lrs, tf.float32),
                        tf.constant(row0, tf.int32))
        self.step += len(lrs)
        self.lr = lrs[-1]

    def _done(self) -> int:
        """Entries of the hit buffer the epoch has filled so far."""
        return self.step if self.stream is not None else min(self.step * self.batch_size, self.n)

    # ---------------------------------------------------------------- metrics

    def train_metrics(self) -> dict[str, float]:
        n = max(min(self.step * self.batch_size, self.n), 1)
        losses = self.step_losses.numpy()[:self.step].astype(np.float64)
        loss_sum = float((losses * self.step_sizes[:self.step]).sum())
        hits = float(self.sample_hits.numpy()[:self._done()].astype(np.float64).sum())
        if self.task == "regression":
            return {"train_loss": loss_sum / n, "train_mae": hits / n * self.y_scale,
                    "train_rmse": math.sqrt(max(loss_sum / n, 0.0)) * self.y_scale}
        return {"train_loss": loss_sum / n, "train_accuracy": hits / n}

    def _val_batches(self):
        if self.val_rows is not None:  # streaming: a window's rows at a time, from disk
            for x, y in self.val_rows.blocks(min(EVAL_BATCH, self.stream.window_rows)):
                yield self._tensors(x, y)
            return
        for a in range(0, int(self.x_val.shape[0]), EVAL_BATCH):
            yield self.x_val[a:a + EVAL_BATCH], self.y_val[a:a + EVAL_BATCH]

    def evaluate(self) -> dict[str, float]:
        if self.x_val is None and self.val_rows is None:
            return {}
        loss_sum = hits = sq = y_sum = y_sq = 0.0
        n = 0
        with tf.device(self.device):
            for xb, yb in self._val_batches():
                out = tf.cast(self._forward(xb), tf.float32)
                rows = int(xb.shape[0])
                n += rows
                loss_sum += float(self._loss(out, yb)) * rows
                hits += float(tf.reduce_sum(self._hits(out, yb)))
                if self.task == "regression":
                    sq += float(tf.reduce_sum(tf.square(out - yb)))
                    y64 = yb.numpy().astype(np.float64)
                    y_sum, y_sq = y_sum + float(y64.sum()), y_sq + float((y64 ** 2).sum())
        if self.task != "regression":
            return {"val_loss": loss_sum / n, "val_accuracy": hits / n}
        if self.y_val is not None:
            y = self.y_val.numpy().astype(np.float64)
            variance = float(((y - y.mean()) ** 2).sum())
        else:  # streaming: from the sums
            variance = max(y_sq - y_sum * y_sum / n, 0.0)
        return {"val_loss": loss_sum / n, "val_mae": hits / n * self.y_scale,
                "val_rmse": math.sqrt(sq / n) * self.y_scale,
                "val_r2": 1 - sq / variance if variance > 0 else 0.0}

    # ---------------------------------------------------------------- files

    def _variable_groups(self) -> dict[str, list]:
        return {"model": list(self.model.variables), "optimizer": list(self.optimizer.variables)}

    def save_checkpoint(self, path: Path) -> None:
        groups = self._variable_groups()
        done = self._done()
        header = {"format": CHECKPOINT_FORMAT, "epoch": self.epoch, "step": self.step,
                  "lr": self.lr, "variables": {g: [[v.path, list(v.shape)] for v in vs]
                                               for g, vs in groups.items()}}
        with h5py.File(path, "w") as f:
            f.attrs["epochd"] = json.dumps(header)
            for g, vs in groups.items():
                group = f.create_group(g)
                for i, v in enumerate(vs):
                    group.create_dataset(str(i), data=np.asarray(v.numpy()))
            f.create_dataset("step_losses", data=self.step_losses.numpy()[:self.step])
            f.create_dataset("sample_hits", data=self.sample_hits.numpy()[:done])

    def load_checkpoint(self, path: Path) -> tuple[int, int]:
        groups = self._variable_groups()
        try:
            with h5py.File(path, "r") as f:
                header = json.loads(f.attrs["epochd"])
                if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
                    raise CheckpointInvalid(f"{path} is not an epochd TensorFlow checkpoint")
                # shapes, in order (Keras numbers some paths per process, e.g. "adam_2/...")
                shapes = {g: [shape for _, shape in header["variables"][g]] for g in groups}
                if shapes != {g: [list(v.shape) for v in vs] for g, vs in groups.items()}:
                    raise CheckpointInvalid(f"{path} holds a different network or optimiser than "
                                            "this job builds")
                values = {g: [np.asarray(f[g][str(i)]) for i in range(len(vs))]
                          for g, vs in groups.items()}
                losses, hits = np.asarray(f["step_losses"]), np.asarray(f["sample_hits"])
        except CheckpointInvalid:
            raise
        except Exception as e:  # h5py and json raise many types for damaged or foreign files
            raise CheckpointInvalid(f"{path} does not load: {type(e).__name__}: {e}") from e
        for g, vs in groups.items():
            for v, value in zip(vs, values[g]):
                v.assign(value)
        self._clear_epoch_buffers()
        self.step_losses[:len(losses)].assign(losses)
        self.sample_hits[:len(hits)].assign(hits)
        self.lr = header["lr"]
        self.epoch, self.step = header["epoch"], header["step"]
        return self.epoch, self.step

    def save_weights(self, path: Path) -> None:
        # Keras insists on the .weights.h5 suffix; the worker hands us a temp name to fill
        _save_with_suffix(Path(path), ".weights.h5", self.model.save_weights)

    def load_weights(self, path: Path) -> None:
        _load_with_suffix(Path(path), ".weights.h5", self.model.load_weights)

    def export(self, folder: Path) -> dict[str, Path]:
        from daemon.fsutil import atomic_write_with
        path = Path(folder) / "model.keras"
        atomic_write_with(path, lambda tmp: _save_with_suffix(tmp, ".keras", self.model.save))
        return {"keras_model": path}

    @classmethod
    def predictor(cls, folder: Path, arch: dict, weights: Path) -> Callable[[np.ndarray], np.ndarray]:
        model = build_model(arch)
        _load_with_suffix(Path(weights), ".weights.h5", model.load_weights)
        forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        binary = arch["task"] == "classification" and arch["output_dim"] == 1

        def predict(x: np.ndarray) -> np.ndarray:
            out = forward(tf.constant(np.asarray(x, np.float32)))
            if arch["task"] == "regression":
                return out.numpy()
            return (tf.sigmoid(out) if binary else tf.nn.softmax(out, axis=1)).numpy()
        return predict


def _mirrored_gpus(replicas: int) -> tf.distribute.MirroredStrategy:
    """One replica per GPU the daemon gave the worker; gradients all-reduced with NCCL."""
    return tf.distribute.MirroredStrategy([f"/GPU:{i}" for i in range(replicas)],
                                          cross_device_ops=tf.distribute.NcclAllReduce())


def _mirrored_cpus(replicas: int) -> tf.distribute.MirroredStrategy:
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    except RuntimeError as e:  # the runtime started already (several engines in one process)
        if len(tf.config.list_logical_devices("CPU")) < replicas:
            raise RuntimeError(f"MirroredStrategy needs {replicas} logical CPU devices, set before "
                               "TensorFlow starts; this process started it already") from e
    return tf.distribute.MirroredStrategy([f"/CPU:{i}" for i in range(replicas)])


_multi_worker: list[tf.distribute.MultiWorkerMirroredStrategy] = []


def machines_met() -> bool:
    """Whether this process's MultiWorkerMirroredStrategy exists: every machine registered."""
    return bool(_multi_worker)


def multi_worker_strategy(spec: dict) -> tf.distribute.MultiWorkerMirroredStrategy:
    """The process's one MultiWorkerMirroredStrategy (it must come before any other use of the
    runtime, and once): the machines of `distributed.workers`, this one `node_rank`, its
    replicas the GPUs the daemon gave the job (NCCL) or its CPU (gRPC ring). Each machine's
    TensorFlow server listens on its own address's port. Created, it waits up to
    `rdzv_timeout` for every machine to be up; later, a machine that goes down makes its
    peers' collectives fail within seconds (the coordination service's heartbeats), and
    at exit each process waits for the others to be done (its shutdown barrier)."""
    if not _multi_worker:
        dist = spec["distributed"]
        _check_port(dist["workers"][dist["node_rank"]], dist["node_rank"])
        replicas = dist.get("replicas", 1)
        on_gpus = _job_device(spec, replicas).startswith("/GPU")
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({"worker": dist["workers"]}), task_type="worker",
            task_id=dist["node_rank"], rpc_layer="grpc",
            num_accelerators={"GPU": replicas} if on_gpus else None)
        # The strategy's coordination service as it would configure it, plus how long to wait
        # for every machine (its default: an hour). Its heartbeats end a run whose peer is gone.
        from tensorflow.compiler.xla.tsl.protobuf.coordination_config_pb2 import CoordinatedJob
        from tensorflow.python.eager import context
        context.context().configure_coordination_service(
            service_type="standalone", service_leader="/job:worker/replica:0/task:0",
            coordinated_jobs=[CoordinatedJob(name="worker", num_tasks=len(dist["workers"]))],
            cluster_register_timeout_in_ms=int(dist["rdzv_timeout"] * 1000))
        how = tf.distribute.experimental.CommunicationImplementation
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        _multi_worker.append(tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver, communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=how.NCCL if on_gpus else how.RING)))
        for sig, handler in handlers.items():  # the service's preemption notifier takes SIGTERM
            if handler is not None:             # over in C; the worker's own handler stops runs
                signal.signal(sig, handler)
    return _multi_worker[0]


def _check_port(address: str, node_rank: int) -> None:
    """This machine's TensorFlow server listens on the port of its `workers` entry: one that
    another program holds would fail deep inside gRPC; say so plainly instead."""
    port = int(address.rsplit(":", 1)[1])
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a past run's TIME_WAIT is no obstacle
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise PortInUse(
                f"port {port} of this machine's entry in distributed.workers ({address}, node_rank "
                f"{node_rank}) is in use by another program. Expected: a free port there for "
                "TensorFlow's server. Free it, or submit the job again on every machine with a "
                "free port in workers.") from None


class Collectives:
    """What the machines of a multi-worker run agree on (see `daemon.worker.TorchCollectives`),
    over the strategy's own all-reduce: node 0's decisions, every machine's resume point, a
    shutdown on any machine. Values travel as JSON (no unpickling of a peer's bytes; tuples
    come back as lists), padded to a power of two of bytes so that a few shapes cover every
    call."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.reduce = None

    def _sum(self, values: np.ndarray) -> np.ndarray:
        """The sum over the machines of `values` (int32); each machine counts once (its first
        replica's contribution)."""
        strategy = multi_worker_strategy(self.spec)
        if self.reduce is None:
            local = max(1, strategy.num_replicas_in_sync // self.spec["distributed"]["nnodes"])

            def contribute(x):
                ctx = tf.distribute.get_replica_context()
                return tf.where(ctx.replica_id_in_sync_group % local == 0, x, tf.zeros_like(x))

            self.reduce = tf.function(
                lambda x: strategy.reduce("SUM", strategy.run(contribute, args=(x,)), axis=None))
        return self.reduce(tf.constant(values, tf.int32)).numpy()

    def _exchange(self, mine: bytes | None) -> list[bytes]:
        """Every machine's bytes (`mine` None: this machine sends nothing)."""
        nodes, me = self.spec["distributed"]["nnodes"], self.spec["distributed"]["node_rank"]
        sizes = np.zeros(nodes, np.int32)
        sizes[me] = -1 if mine is None else len(mine)
        sizes = self._sum(sizes)
        width = 1 << max(6, int(sizes.max() - 1).bit_length())
        rows = np.zeros((nodes, width), np.int32)
        if mine:
            rows[me, :len(mine)] = np.frombuffer(mine, np.uint8)
        rows = self._sum(rows).astype(np.uint8)
        return [None if n < 0 else rows[k, :n].tobytes() for k, n in enumerate(sizes)]

    def broadcast(self, value):
        me = self.spec["distributed"]["node_rank"]
        return orjson.loads(self._exchange(orjson.dumps(value) if me == 0 else None)[0])

    def gather(self, value) -> list:
        return [orjson.loads(b) for b in self._exchange(orjson.dumps(value))]

    def any(self, flag: bool) -> bool:
        return bool(self._sum(np.array([1 if flag else 0]))[0] > 0)

    def barrier(self) -> None:
        self._sum(np.zeros(1))


def _save_with_suffix(path: Path, suffix: str, save: Callable[[str], None]) -> None:
    if path.name.endswith(suffix):
        save(str(path))
        return
    named = path.with_name(path.name + suffix)
    try:
        save(str(named))
        os.replace(named, path)
    finally:
        named.unlink(missing_ok=True)


def _load_with_suffix(path: Path, suffix: str, load: Callable[[str], None]) -> None:
    if path.name.endswith(suffix):
        load(str(path))
        return
    raise ValueError(f"{path}: expected a file whose name ends in {suffix}")


ENGINE = TensorFlowEngine
