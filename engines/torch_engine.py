"""The PyTorch engine.

The hot loop follows the fastest hand-written recipe we measured: the data is one tensor on the
device, each epoch gathers it once in its order (`index_select`) and batches are contiguous
slices of that; `zero_grad(set_to_none=True)`; Adam/AdamW fused where the device supports it
(torch.optim's kernel, called without torch.optim's classes: see `optim`); the epoch's
losses and hits are gathered once per engine call into per-epoch buffers on the device, so the
step itself does exactly the work of a hand-written loop.

The fast path. For the common network (an `mlp` with ReLU, or `linear`; no batch norm; full
precision) most of a small step's time is autograd's bookkeeping and the dropout layers' RNG
calls, not arithmetic. There the engine runs a hand-derived step instead: forward with
`addmm` and in-place ReLU, the backward pass written out (two matrix products and a mask per
layer), the optimiser unchanged (its `step()` reads the gradients we set). The arithmetic is
autograd's, so the gradients agree with autograd's to float rounding (tested); the one
difference is where dropout masks come from: blocks of MASK_BLOCK_STEPS steps drawn at once from
a generator seeded by (seed, epoch, block), a pure function like the sample order, so a resumed
epoch draws the very masks it would have. Other networks take the autograd path, whose dropout
draws from torch's global RNG (saved in checkpoints).

Checkpoints are `torch.save` dicts of tensors and plain numbers, loaded with
`weights_only=True`: RNG states are uint8 tensors, nothing is pickled.
"""
import math
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from daemon.errors import CheckpointInvalid, DeviceUnavailable

from . import Engine, architecture, gpu_name, gpu_plan, job_threads, optim
from .data import Prepared, epoch_order, regression_scale

CHECKPOINT_FORMAT = "epochd-torch-1"
EVAL_BATCH = 65536
MASK_BLOCK_STEPS = 64  # the fast path draws dropout masks for this many steps at once
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
               "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "silu": nn.SiLU, "selu": nn.SELU}


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d that also trains on a batch of one row: torch cannot take a batch variance
    of one row and raises, so an epoch whose rows leave one over for its last batch (33 rows at
    batch 32) failed. Such a batch (or a DDP rank's empty share of a short last step) is
    normalised with the running statistics, as in evaluation, and leaves them as they were; its
    row still trains every weight. Same parameters and state-dict keys as BatchNorm1d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] <= 1:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                            self.bias, False, 0.0, self.eps)
        return super().forward(x)


class ResidualBlock(nn.Module):
    """x + dropout(linear(act(linear(norm(x))))): the tabular ResNet block."""

    def __init__(self, width: int, inner: int, act: type, dropout: float, batch_norm: bool):
        super().__init__()
        self.body = nn.Sequential(
            BatchNorm(width) if batch_norm else nn.Identity(),
            nn.Linear(width, inner), act(), nn.Dropout(dropout), nn.Linear(inner, width))

    def forward(self, x):
        return x + self.body(x)


def build_model(arch: dict) -> nn.Module:
    """The network model.json describes: `mlp`, `linear` or `resnet`."""
    act = ACTIVATIONS[arch["activation"]]
    d_in, d_out, hidden = arch["input_dim"], arch["output_dim"], arch["hidden_units"]
    p, bn = arch["dropout_rate"], arch["batch_norm"]
    layers: list[nn.Module] = []
    if arch["model_type"] == "mlp":
        for width in hidden:
            layers += [nn.Linear(d_in, width)] + ([BatchNorm(width)] if bn else [])
            layers += [act()] + ([nn.Dropout(p)] if p > 0 else [])
            d_in = width
    elif arch["model_type"] == "resnet" and hidden:
        width = hidden[0]
        layers += [nn.Linear(d_in, width)]
        layers += [ResidualBlock(width, inner, act, p, bn) for inner in hidden]
        layers += [act()]
        d_in = width
    layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


def make_optimizer(params, opt: dict, lr: float, device: str, scaled: bool = False):
    """The job's optimiser: one of `engines.optim`'s (torch.optim's algorithms without the
    import of torch._dynamo that torch.optim's classes cost; Adam and AdamW fused) unless a
    GradScaler (`scaled`, fp16) must step it, or the parameters are not ones they take: then
    torch.optim's."""
    params = list(params)
    if not scaled and optim.usable(params):
        match opt["name"]:
            case "adam" | "adamw":
                return optim.FusedAdam(params, lr=lr, betas=tuple(opt["betas"]), eps=opt["eps"],
                                       weight_decay=opt["weight_decay"],
                                       decoupled_weight_decay=opt["name"] == "adamw")
            case "sgd":
                return optim.SGD(params, lr=lr, momentum=opt["momentum"], nesterov=opt["nesterov"],
                                 weight_decay=opt["weight_decay"])
            case "rmsprop":
                return optim.RMSprop(params, lr=lr, momentum=opt["momentum"], eps=opt["eps"],
                                     weight_decay=opt["weight_decay"])
    fused = {"fused": True} if device in ("cpu", "cuda") else {}
    match opt["name"]:
        case "adam":
            return torch.optim.Adam(params, lr=lr, betas=tuple(opt["betas"]), eps=opt["eps"],
                                    weight_decay=opt["weight_decay"], **fused)
        case "adamw":
            return torch.optim.AdamW(params, lr=lr, betas=tuple(opt["betas"]), eps=opt["eps"],
                                     weight_decay=opt["weight_decay"], **fused)
        case "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=opt["momentum"],
                                   nesterov=opt["nesterov"], weight_decay=opt["weight_decay"])
        case "rmsprop":
            return torch.optim.RMSprop(params, lr=lr, momentum=opt["momentum"], eps=opt["eps"],
                                       weight_decay=opt["weight_decay"])
    raise ValueError(f"unknown optimizer {opt['name']!r}")


class TorchEngine(Engine):
    framework = "pytorch"
    weights_file = "model.safetensors"
    best_file = "best.safetensors"
    checkpoint_suffix = ".pt"

    def __init__(self, spec: dict, data: Prepared, cpu_share: int):
        # one of `world` data-parallel ranks when the worker started a process group (DDP)
        distributed = tdist.is_available() and tdist.is_initialized()
        self.rank, self.world = (tdist.get_rank(), tdist.get_world_size()) if distributed else (0, 1)
        self.threads = job_threads(spec, data.input_dim, cpu_share)
        # set once, before any torch work: changing it later in a process slows what follows
        torch.set_num_threads(self.threads)
        torch.manual_seed(spec["seed"])  # weights' init, then dropout masks, draw from this
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = pick_device(spec["devices"], gpu_plan(spec["devices"], self.world, local_rank))
        self.gpu_index = self.device.index if self.device.type == "cuda" else None
        if self.device.type == "cuda":  # with DDP, this machine's GPUs, one per rank
            here = range(int(os.environ.get("LOCAL_WORLD_SIZE", 1))) if self.world > 1 else [self.device.index]
            self.devices = [gpu_name(i, torch.cuda.get_device_name(i)) for i in here]
        else:
            self.devices = [str(self.device)] * self.world
        self.spec, self.task = spec, data.task
        # a step is one optimizer update: with accumulation, over `accumulation` micro-batches
        self.micro_batch = spec["batch_size"]
        self.accumulation = spec["gradient_accumulation_steps"]
        self.batch_size = self.micro_batch * self.accumulation * self.world  # rows per step, all ranks
        self.y_scale = regression_scale(data.preprocess)
        self.model = build_model(architecture(spec, data)).to(self.device)
        self.precision = resolve_precision(spec["mixed_precision"], self.device)
        self.optimizer = make_optimizer(self.model.parameters(), spec["optimizer"],
                                        spec["learning_rate"], self.device.type,
                                        scaled=self.precision == "fp16")
        self.binary = data.task == "classification" and data.n_outputs == 1
        self.loss_fn = self._loss_fn(data)
        self.place_rows(spec, data)
        self.steps_per_epoch = math.ceil(self.n / self.batch_size)
        self.autocast = (torch.autocast(self.device.type, dtype=AUTOCAST[self.precision])
                         if self.precision != "no" else nullcontext())
        # fp16: the loss is scaled up so small gradients survive, and the scale adapts (halves
        # on an overflow, whose step is skipped; doubles after 2,000 clean steps); its state
        # is part of every checkpoint
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.epoch = self.step = 0
        self.lr = spec["learning_rate"]
        self.xs = self.ys = None
        self._allocate_epoch_buffers()
        self.fast = self._fast_layers(spec) if self.world == 1 else None
        self.net = self.model
        if self.world > 1:
            # DDP all-reduces gradients in backward; each rank then draws its own dropout masks
            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            torch.manual_seed(int(np.random.SeedSequence([spec["seed"], self.rank]).generate_state(1)[0]))
        self.dropout = spec["algorithm_params"]["dropout_rate"]
        self._masks: tuple[int, int, list[torch.Tensor]] | None = None  # (epoch, block, masks)

    def _fast_layers(self, spec: dict) -> list[nn.Linear] | None:
        """The Linear layers when the hand-derived step covers this network, else None."""
        ap = spec["algorithm_params"]
        plain = (ap["model_type"] == "linear"
                 or (ap["model_type"] == "mlp" and ap["activation"] == "relu" and not ap["batch_norm"]))
        if not plain or self.precision != "no":
            return None
        return [m for m in self.model if isinstance(m, nn.Linear)]

    def _loss_fn(self, data: Prepared) -> nn.Module:
        if data.task == "regression":
            return nn.MSELoss()
        return nn.BCEWithLogitsLoss() if data.n_outputs == 1 else nn.CrossEntropyLoss()

    def _tensors(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # np.require: pandas may hand out read-only arrays, which torch will not wrap
        xt = torch.from_numpy(np.require(x, np.float32, ["C", "W"])).to(self.device)
        if self.task == "classification" and not self.binary:
            return xt, torch.from_numpy(np.require(y, np.int64, ["C", "W"])).to(self.device)
        return xt, torch.from_numpy(np.require(y, np.float32, ["C", "W"])).reshape(-1, 1).to(self.device)

    def _allocate_epoch_buffers(self) -> None:
        # The epoch's running metrics live in two buffers filled once per engine call: each
        # step's mean loss, and each sample's hit (correct, or |error| for regression). The hot
        # loop only keeps references; the sums at the end are one reduction over the whole
        # buffer, so they do not depend on how the steps were split into calls (exact resume).
        # Streaming keeps each step's sum of hits instead, so no buffer grows with the rows.
        self.step_losses = torch.zeros(self.steps_per_epoch, device=self.device)
        self.sample_hits = torch.zeros(self.steps_per_epoch if self.stream else self.n,
                                       device=self.device)
        sizes = torch.full((self.steps_per_epoch,), float(self.batch_size), dtype=torch.float64)
        sizes[-1] = self.n - self.batch_size * (self.steps_per_epoch - 1)
        self.step_sizes = sizes.to(self.device)

    def _clear_epoch_buffers(self) -> None:
        self.step_losses.zero_()
        self.sample_hits.zero_()

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "numpy": np.__version__}

    def start_epoch(self, epoch: int, step: int) -> None:
        if self.stream is None:
            order = torch.from_numpy(epoch_order(self.spec["seed"], epoch, self.n, self.spec["shuffle"]))
            order = order.to(self.device)
            self.xs, self.ys = self.x.index_select(0, order), self.y.index_select(0, order)
        if step == 0:
            self._clear_epoch_buffers()
        self.epoch, self.step = epoch, step
        self.model.train()

    def train_steps(self, lrs: Sequence[float]) -> None:
        if not lrs:
            return
        if self.world > 1:
            return self._train_steps_ddp(lrs)
        calls = self.stream_calls(lrs)
        if len(calls) > 1:
            for call in calls:
                self.train_steps(call)
            return
        model, opt, loss_fn, bs = self.model, self.optimizer, self.loss_fn, self.batch_size
        optimizer_step = self._optimizer_step if self.precision == "fp16" else opt.step
        first, start = self.step, self.step * bs
        xs, ys, base = self.xs, self.ys, start
        if self.stream is not None:  # this call's rows, from the window(s) they lie in
            xs, ys = self._span(start, (first + len(lrs)) * bs)
            base = 0
        losses, outputs = [], []
        for i, lr in enumerate(lrs):
            if lr != self.lr:
                for group in opt.param_groups:
                    group["lr"] = lr
                self.lr = lr
            xb = xs[base + i * bs:base + (i + 1) * bs]
            yb = ys[base + i * bs:base + (i + 1) * bs]
            if self.accumulation > 1:
                loss, out = self._accumulated_step(first + i, xb, yb)
            elif self.fast is not None:
                loss, out = self._fast_step(first + i, xb, yb)
            else:
                with self.autocast:
                    out = model(xb)
                    loss = loss_fn(out, yb)
                opt.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
            optimizer_step()
            losses.append(loss.detach())  # detached: each step's graph is freed at once
            outputs.append(out.detach())
        self.step += len(lrs)
        with torch.no_grad():  # the bookkeeping of the whole call, in a handful of ops
            self.step_losses[first:self.step] = torch.stack(losses)
            end = min(self.step * bs, self.n)
            hits = self._hits(torch.cat(outputs), ys[base:base + end - start])
            if self.stream is None:
                self.sample_hits[start:end] = hits
            else:  # each step's own sum, the same however the steps were split into calls
                full = len(hits) // bs
                sums = hits[:full * bs].view(full, bs).sum(1)
                if full * bs < len(hits):  # the epoch's short last step
                    sums = torch.cat([sums, hits[full * bs:].sum().reshape(1)])
                self.sample_hits[first:self.step] = sums

    def _span(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows a..b-1 of the epoch's order, from the streaming cache, as tensors."""
        return self._tensors(*self.stream.span(self.epoch, a, b))

    def _train_steps_ddp(self, lrs: Sequence[float]) -> None:
        """This rank's part of each step: its share of the step's rows (the global batch split
        in `world` nearly equal runs, in rank order), in micro-batches. Each micro-batch's mean
        loss is weighted by its rows' share of the whole step times `world`, which DDP's
        averaging undoes: the update is the whole step's mean-loss gradient, as one process
        would compute it. A rank left without rows still joins the all-reduce."""
        if self.stream is None:
            return self._ddp_steps(lrs, self.xs, self.ys, 0)
        for call in self.stream_calls(lrs):  # a window's rows at a time, as without DDP
            row0 = self.step * self.batch_size
            xs, ys = self._span(row0, min(row0 + len(call) * self.batch_size, self.n))
            self._ddp_steps(call, xs, ys, row0)

    def _ddp_steps(self, lrs: Sequence[float], xs_all, ys_all, row0: int) -> None:
        """`xs_all`: the epoch's rows from `row0` on (all of them, or a streaming call's span)."""
        opt, bs, micro, w = self.optimizer, self.batch_size, self.micro_batch, self.world
        for lr in lrs:
            if lr != self.lr:
                for group in opt.param_groups:
                    group["lr"] = lr
                self.lr = lr
            start = self.step * bs
            rows = min(bs, self.n - start)
            sizes = [rows // w + (1 if r < rows % w else 0) for r in range(w)]
            first = start + sum(sizes[:self.rank])
            mine = sizes[self.rank]
            xs, ys = xs_all[first - row0:first - row0 + mine], ys_all[first - row0:first - row0 + mine]
            opt.zero_grad(set_to_none=True)
            pieces = list(range(0, mine, micro)) or [0]
            loss, outs = torch.zeros((), device=self.device), []
            for j, a in enumerate(pieces):
                xm, ym = xs[a:a + micro], ys[a:a + micro]
                with (self.net.no_sync() if j < len(pieces) - 1 else nullcontext()), self.autocast:
                    out = self.net(xm)
                    m_loss = self.loss_fn(out, ym) if len(xm) else out.sum() * 0.0
                self.scaler.scale(m_loss * (len(xm) * w / rows)).backward()
                loss = loss + m_loss.detach().float() * (len(xm) / rows)
                outs.append(out.detach())
            self._optimizer_step()
            with torch.no_grad():  # this rank's parts; train_metrics sums them over the ranks
                self.step_losses[self.step] = loss
                if mine and self.stream is None:
                    self.sample_hits[first:first + mine] = self._hits(torch.cat(outs), ys)
                elif mine:  # streaming: the step's sum of this rank's hits
                    self.sample_hits[self.step] = self._hits(torch.cat(outs), ys).sum()
            self.step += 1

    def _optimizer_step(self) -> None:
        if self.precision == "fp16":
            self.scaler.step(self.optimizer)  # unscales; skips the step if a gradient overflowed
            self.scaler.update()
        else:
            self.optimizer.step()

    def _accumulated_step(self, step: int, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One update from micro-batches of the step's rows, taken one after the other: each
        micro-batch's mean loss weighted by its share of the rows, so the gradient is the
        whole batch's mean-loss gradient, as if it had been one batch (a short last batch
        included). Only one micro-batch's activations are alive at a time."""
        rows, micro = len(xb), self.micro_batch
        self.optimizer.zero_grad(set_to_none=True)
        masks = self._step_masks(step, rows) if self.fast is not None and self.dropout > 0 else None
        loss, outs = torch.zeros((), device=self.device), []
        for a in range(0, rows, micro):
            xm, ym, share = xb[a:a + micro], yb[a:a + micro], min(micro, rows - a) / rows
            if self.fast is not None:
                with torch.no_grad():
                    m_loss, out, grads = self.fast_grads(
                        xm, ym, None if masks is None else [m[a:a + micro] for m in masks])
                    for layer, (gw, gb) in zip(self.fast, grads):
                        if layer.weight.grad is None:
                            layer.weight.grad, layer.bias.grad = gw.mul_(share), gb.mul_(share)
                        else:
                            layer.weight.grad.add_(gw, alpha=share)
                            layer.bias.grad.add_(gb, alpha=share)
            else:
                with self.autocast:
                    out = self.model(xm)
                    m_loss = self.loss_fn(out, ym)
                self.scaler.scale(m_loss * share).backward()
            loss = loss + m_loss.detach().float() * share
            outs.append(out.detach())
        return loss, torch.cat(outs)

    # ---------------------------------------------------------------- the fast path

    @torch.no_grad()
    def _fast_step(self, step: int, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's forward and backward by hand; sets each parameter's .grad."""
        masks = self._step_masks(step, len(xb)) if self.dropout > 0 else None
        loss, out, grads = self.fast_grads(xb, yb, masks)
        for layer, (gw, gb) in zip(self.fast, grads):
            layer.weight.grad, layer.bias.grad = gw, gb
        return loss, out

    def fast_grads(self, x: torch.Tensor, y: torch.Tensor, masks: list[torch.Tensor] | None):
        """(loss, output, [(dW, db) per Linear]) of the plain network on one batch, with `masks`
        (per hidden layer: 0, or 1 / (1 - dropout) for kept units) as its dropout."""
        layers = self.fast
        acts = [x]
        h = x
        for i, layer in enumerate(layers[:-1]):
            h = torch.addmm(layer.bias, h, layer.weight.t()).clamp_min_(0)
            if masks is not None:
                h.mul_(masks[i])
            acts.append(h)
        last = layers[-1]
        out = torch.addmm(last.bias, h, last.weight.t())
        loss = self.loss_fn(out, y)
        g = self._output_grad(out, y)
        grads: list = [None] * len(layers)
        for i in range(len(layers) - 1, -1, -1):
            grads[i] = (torch.mm(g.t(), acts[i]), g.sum(0))
            if i:
                g = torch.mm(g, layers[i].weight)
                g = g.mul_(masks[i - 1]) if masks is not None else g
                g.mul_(acts[i] > 0)
        return loss, out, grads

    def _output_grad(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d(mean loss)/d(output) for the engine's three losses."""
        if self.task == "regression":
            return (out - y).mul_(2.0 / out.numel())
        if self.binary:
            return torch.sigmoid(out).sub_(y).div_(out.numel())
        g = torch.softmax(out, dim=1)
        g[torch.arange(len(y), device=out.device), y] -= 1.0
        return g.div_(len(y))

    def _step_masks(self, step: int, rows: int) -> list[torch.Tensor]:
        """This step's dropout masks: slices of its block's, drawn from (seed, epoch, block)."""
        block, bs = step // MASK_BLOCK_STEPS, self.batch_size
        if self._masks is None or self._masks[:2] != (self.epoch, block):
            first = block * MASK_BLOCK_STEPS * bs
            n_rows = min(self.n, first + MASK_BLOCK_STEPS * bs) - first
            seed = int(np.random.SeedSequence([self.spec["seed"], self.epoch, block]).generate_state(1)[0])
            gen = torch.Generator(device=self.device).manual_seed(seed)
            keep = 1.0 - self.dropout
            masks = [(torch.rand(n_rows, layer.out_features, generator=gen, device=self.device)
                      >= self.dropout).float().mul_(1.0 / keep) for layer in self.fast[:-1]]
            self._masks = (self.epoch, block, masks)
        offset = (step - block * MASK_BLOCK_STEPS) * bs
        return [m[offset:offset + rows] for m in self._masks[2]]

    def _hits(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per sample: 1.0 if predicted right (classification), else |error| (regression)."""
        if self.task == "regression":
            return (out.float() - y).abs().reshape(-1)
        if self.binary:
            return ((out > 0) == (y > 0.5)).reshape(-1).float()
        return (out.argmax(1) == y).float()

    def _epoch_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's step losses and sample hits so far, summed over the ranks (each holds
        its own parts, zeros elsewhere). A collective: every rank calls it at the same point."""
        done = self.step if self.stream is not None else min(self.step * self.batch_size, self.n)
        losses, hits = self.step_losses[:self.step], self.sample_hits[:done]
        if self.world > 1:
            losses, hits = losses.clone(), hits.clone()
            tdist.all_reduce(losses)
            tdist.all_reduce(hits)
        return losses, hits

    def train_metrics(self) -> dict[str, float]:
        done = min(self.step * self.batch_size, self.n)
        n = max(done, 1)
        step_losses, sample_hits = self._epoch_sums()
        loss_sum = (step_losses.double() * self.step_sizes[:self.step]).sum().item()
        hits = sample_hits.double().sum().item()
        if self.task == "regression":
            return {"train_loss": loss_sum / n, "train_mae": hits / n * self.y_scale,
                    "train_rmse": math.sqrt(max(loss_sum / n, 0.0)) * self.y_scale}
        return {"train_loss": loss_sum / n, "train_accuracy": hits / n}

    def _val_batches(self):
        if self.val_rows is not None:
            for x, y in self.val_rows.blocks(min(EVAL_BATCH, self.stream.window_rows)):  # a window
                yield self._tensors(x, y)
            return
        for a in range(0, len(self.x_val), EVAL_BATCH):
            yield self.x_val[a:a + EVAL_BATCH], self.y_val[a:a + EVAL_BATCH]

    @torch.inference_mode()
    def evaluate(self) -> dict[str, float]:
        if self.x_val is None and self.val_rows is None:
            return {}
        self.model.eval()
        loss_sum = hits = sq = 0.0
        n = y_sum = y_sq = 0.0
        for xb, yb in self._val_batches():
            with self.autocast:
                out = self.model(xb).float()
            loss_sum += self.loss_fn(out, yb).item() * len(xb)
            hits += self._hits(out, yb).sum().item()
            n += len(xb)
            if self.task == "regression":
                sq += ((out - yb) ** 2).sum().item()
                y_sum += yb.double().sum().item()
                y_sq += (yb.double() ** 2).sum().item()
        self.model.train()
        if self.task != "regression":
            return {"val_loss": loss_sum / n, "val_accuracy": hits / n}
        if self.y_val is not None:
            variance = float(((self.y_val - self.y_val.mean()) ** 2).sum())
        else:  # streaming: from the sums, in float64
            variance = max(y_sq - y_sum * y_sum / n, 0.0)
        return {"val_loss": loss_sum / n, "val_mae": hits / n * self.y_scale,
                "val_rmse": math.sqrt(sq / n) * self.y_scale,
                "val_r2": 1 - sq / variance if variance > 0 else 0.0}

    def checkpoint_state(self) -> dict:
        """What a checkpoint holds. With DDP a collective (the epoch's sums and every rank's
        RNG state are gathered): every rank calls it, rank 0 writes it."""
        step_losses, sample_hits = self._epoch_sums()
        rng = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        ranks = [(rng, cuda)]
        if self.world > 1:
            ranks = [None] * self.world
            tdist.all_gather_object(ranks, (rng, cuda))
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng_cpu": rng, "rng_ranks": [r[0] for r in ranks],
            "rng_cuda": [r[1] for r in ranks] if cuda is not None else [],  # one per rank
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step, "lr": self.lr,
            "step_losses": step_losses.cpu(), "sample_hits": sample_hits.cpu(),
        }

    def save_checkpoint(self, path: Path) -> None:
        torch.save(self.checkpoint_state(), path)

    def load_checkpoint(self, path: Path) -> tuple[int, int]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointInvalid(f"{path} is not an epochd PyTorch checkpoint")
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except CheckpointInvalid:
            raise
        except Exception as e:  # torch raises many types for damaged or foreign files
            raise CheckpointInvalid(f"{path} does not load: {type(e).__name__}: {e}") from e
        ranks = state.get("rng_ranks") or [state["rng_cpu"]]
        if len(ranks) != self.world:
            raise CheckpointInvalid(f"{path} was written by {len(ranks)} rank(s); this run has "
                                    f"{self.world}. Expected: the same distributed.processes")
        torch.set_rng_state(ranks[self.rank])
        if state["rng_cuda"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"][self.rank % len(state["rng_cuda"])], self.device)
        self._clear_epoch_buffers()
        if self.rank == 0:  # the epoch's sums so far; the other ranks add only what follows
            self.step_losses[:len(state["step_losses"])] = state["step_losses"].to(self.device)
            self.sample_hits[:len(state["sample_hits"])] = state["sample_hits"].to(self.device)
        self.lr = state["lr"]
        self.epoch, self.step = state["epoch"], state["step"]
        return self.epoch, self.step

    def save_weights(self, path: Path) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(tensors, str(path), metadata={"format": "epochd-weights"})

    def load_weights(self, path: Path) -> None:
        self.model.load_state_dict(load_file(str(path), device=str(self.device)))

    @classmethod
    def predictor(cls, folder: Path, arch: dict, weights: Path) -> Callable[[np.ndarray], np.ndarray]:
        model = build_model(arch)
        model.load_state_dict(load_file(str(weights)))
        model.eval()
        binary = arch["task"] == "classification" and arch["output_dim"] == 1

        @torch.inference_mode()
        def predict(x: np.ndarray) -> np.ndarray:
            out = model(torch.from_numpy(x))
            if arch["task"] == "regression":
                return out.numpy()
            return (torch.sigmoid(out) if binary else torch.softmax(out, dim=1)).numpy()
        return predict


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(asked: str, device: torch.device) -> str:
    """"auto": bf16 on a GPU that has it, else fp16 on a GPU; full precision on the CPU, where
    autocast slows small networks down."""
    if asked != "auto":
        return asked
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def pick_device(devices, index: int | None) -> torch.device:
    """`index` (from `gpu_plan`): the visible GPU to train on, None for the CPU. "auto" falls
    back to the CPU when no GPU is visible; a GPU asked for by count or index must exist."""
    if index is None:
        return torch.device("cpu")
    if torch.cuda.is_available():
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"the job asks for GPU {index} but {torch.cuda.device_count()} "
                                    "are visible. Expected: an index below that, or \"auto\".")
        return torch.device("cuda", index)
    if devices == "auto":
        return torch.device("cpu")
    raise DeviceUnavailable(f"the job asks for a GPU (devices: {devices!r}) but none is visible to "
                            'the worker. Expected: a machine with a CUDA GPU; or set "devices": '
                            '"auto" to fall back to the CPU.')


ENGINE = TorchEngine
