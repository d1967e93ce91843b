"""Early stopping and learning-rate schedules as pure functions of (epoch, step, metric history).

Nothing here keeps state between calls: the worker asks again at every epoch with the history
folded from the log, so a resumed job stops and schedules exactly as an uninterrupted one would,
and PyTorch and TensorFlow jobs get the same decisions by construction.

Epochs are 0-based inside this module (`epoch0`), as in Keras' and torch's callbacks; events and
the README count from 1. The rules, in the README's words:

Early stopping (Keras' `EarlyStopping`, exactly): epochs before `start_from_epoch` and epochs
without a value for `monitor` are skipped. Each counted epoch adds 1 to `wait`; an epoch whose
value beats `best` by more than `min_delta` (below it in `min` mode, above in `max`) becomes the
new best, and resets `wait` to 0 unless a `baseline` is set and the value does not also beat the
baseline by `min_delta`. Training stops after an epoch where `wait >= patience`, except the very
first epoch.

Schedules (torch's rules, named after their `torch.optim.lr_scheduler` classes):
- `none`: the base rate throughout.
- `step`: base * gamma ** (epoch0 // step_size); the seed's `"step"` is step_size=30, gamma=0.1.
- `multistep`: base * gamma ** (number of milestones <= epoch0).
- `exponential`: base * gamma ** epoch0.
- `cosine`: for epoch0 < warmup_epochs a linear ramp base * (f + (1 - f) * epoch0 / warmup)
  with f = warmup_start_factor; then eta_min + (base - eta_min) * (1 + cos(pi * t / T)) / 2 with
  t = epoch0 - warmup, T = t_max (default epochs - warmup); t is capped at T (torch would rise again).
- `plateau`: ReduceLROnPlateau over the monitored metric of finished epochs: a value is better
  when it beats the best by `threshold` (relative: best * (1 -/+ threshold); absolute: best -/+
  threshold); after more than `patience` epochs without a better value the rate is multiplied by
  `factor` (not below `min_lr`), then `cooldown` epochs pass before bad epochs count again.
- `onecycle`: OneCycleLR, per step over epochs * steps_per_epoch steps: from max_lr / div_factor
  up to max_lr over pct_start of the steps, then down to initial / final_div_factor (cosine or
  linear annealing; `three_phase` as torch). Only the rate cycles (torch's cycle_momentum=False).
All schedules but `onecycle` change the rate at epoch boundaries only.
"""
import math
from dataclasses import dataclass

LOSS_LIKE_MAX = ("accuracy", "r2")


def resolve_mode(monitor: str, mode: str) -> str:
    """`auto` means max for accuracy and r2, min for losses and errors."""
    if mode != "auto":
        return mode
    return "max" if any(word in monitor for word in LOSS_LIKE_MAX) else "min"


def beats(value: float, reference: float, mode: str, min_delta: float) -> bool:
    """Keras' `_is_improvement`: value beats reference by more than min_delta."""
    if mode == "min":
        return value + min_delta < reference
    return value - min_delta > reference


@dataclass(frozen=True)
class EarlyStopState:
    best_value: float | None
    best_epoch: int | None    # 1-based, None before any counted epoch
    wait: int                 # counted epochs since the last improvement
    stop: bool                # stop after the last epoch of the history given


def early_stopping(values: list[float | None], *, patience: int, mode: str,
                   min_delta: float = 0.0, baseline: float | None = None,
                   start_from_epoch: int = 0) -> EarlyStopState:
    """Replay Keras' EarlyStopping over per-epoch monitor values (index 0 = epoch 1)."""
    best = math.inf if mode == "min" else -math.inf
    best_epoch, wait, stop = None, 0, False
    for epoch0, value in enumerate(values):
        stop = False
        if value is None or epoch0 < start_from_epoch:
            continue
        wait += 1
        if beats(value, best, mode, min_delta):
            best, best_epoch = value, epoch0 + 1
            if baseline is None or beats(value, baseline, mode, min_delta):
                wait = 0
            continue
        stop = wait >= patience and epoch0 > 0
    best_value = None if best_epoch is None else best
    return EarlyStopState(best_value, best_epoch, wait, stop)


def best_epoch(values: list[float | None], mode: str) -> tuple[int | None, float | None]:
    """The epoch (1-based) whose value is best, first one on ties; what `best.*` weights hold."""
    best_i, best_v = None, None
    for i, value in enumerate(values):
        if value is not None and (best_v is None or beats(value, best_v, mode, 0.0)):
            best_i, best_v = i + 1, value
    return best_i, best_v


# ---------------------------------------------------------------- learning-rate schedules

@dataclass(frozen=True)
class PlateauState:
    lr: float
    best: float
    num_bad_epochs: int
    cooldown_counter: int
    reductions: int


def plateau(values: list[float | None], base_lr: float, s: dict) -> PlateauState:
    """ReduceLROnPlateau replayed over the metric values of finished epochs."""
    mode = resolve_mode(s["monitor"], s["mode"])
    best = math.inf if mode == "min" else -math.inf
    lr, bad, cooldown, reductions = base_lr, 0, 0, 0
    for value in values:
        if value is None:
            continue
        if _plateau_better(value, best, mode, s["threshold_mode"], s["threshold"]):
            best, bad = value, 0
        else:
            bad += 1
        if cooldown > 0:
            cooldown, bad = cooldown - 1, 0
        if bad > s["patience"]:
            new_lr = max(lr * s["factor"], s["min_lr"])
            if lr - new_lr > 1e-8:  # torch's eps: changes smaller than this are ignored
                lr, reductions = new_lr, reductions + 1
            cooldown, bad = s["cooldown"], 0
    return PlateauState(lr, best, bad, cooldown, reductions)


def _plateau_better(a: float, best: float, mode: str, threshold_mode: str, threshold: float) -> bool:
    if mode == "min":
        return a < (best * (1 - threshold) if threshold_mode == "rel" else best - threshold)
    return a > (best * (1 + threshold) if threshold_mode == "rel" else best + threshold)


def epoch_lr(s: dict, base_lr: float, epoch0: int, epochs: int,
             values: list[float | None]) -> float:
    """The rate of epoch `epoch0` for every schedule that changes only between epochs."""
    match s["name"]:
        case "none":
            return base_lr
        case "step":
            return base_lr * s["gamma"] ** (epoch0 // s["step_size"])
        case "multistep":
            return base_lr * s["gamma"] ** sum(1 for m in s["milestones"] if m <= epoch0)
        case "exponential":
            return base_lr * s["gamma"] ** epoch0
        case "cosine":
            return _cosine(s, base_lr, epoch0, epochs)
        case "plateau":
            return plateau(values[:epoch0], base_lr, s).lr
    raise ValueError(f"{s['name']!r} is not an epoch-level schedule")


def _cosine(s: dict, base_lr: float, epoch0: int, epochs: int) -> float:
    warmup = s["warmup_epochs"]
    if epoch0 < warmup:
        f = s["warmup_start_factor"]
        return base_lr * (f + (1 - f) * epoch0 / warmup)
    t_max = s["t_max"] or max(1, epochs - warmup)
    t = min(epoch0 - warmup, t_max)
    return s["eta_min"] + (base_lr - s["eta_min"]) * (1 + math.cos(math.pi * t / t_max)) / 2


def onecycle_lr(s: dict, base_lr: float, step_num: int, total_steps: int) -> float:
    """torch's OneCycleLR at global step `step_num` (0-based)."""
    max_lr = s["max_lr"] or base_lr
    initial = max_lr / s["div_factor"]
    minimum = initial / s["final_div_factor"]
    up_end = float(s["pct_start"] * total_steps) - 1
    if s["three_phase"]:
        phases = [(up_end, initial, max_lr), (2 * up_end, max_lr, initial),
                  (total_steps - 1, initial, minimum)]
    else:
        phases = [(up_end, initial, max_lr), (total_steps - 1, max_lr, minimum)]
    start_step = 0.0
    for i, (end_step, start_lr, end_lr) in enumerate(phases):
        if step_num <= end_step or i == len(phases) - 1:
            pct = (step_num - start_step) / (end_step - start_step)
            return _anneal(s["anneal_strategy"], start_lr, end_lr, pct)
        start_step = end_step
    raise AssertionError("unreachable: the last phase always answers")


def _anneal(strategy: str, start: float, end: float, pct: float) -> float:
    if strategy == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


def step_lrs(s: dict, base_lr: float, epoch0: int, start_step: int, count: int,
             steps_per_epoch: int, epochs: int, values: list[float | None]) -> list[float]:
    """The rate of each of `count` steps from `start_step` of epoch `epoch0`."""
    if s["name"] != "onecycle":
        return [epoch_lr(s, base_lr, epoch0, epochs, values)] * count
    total = epochs * steps_per_epoch
    first = epoch0 * steps_per_epoch + start_step
    return [onecycle_lr(s, base_lr, min(n, total - 1), total) for n in range(first, first + count)]


def lr_change_reason(s: dict, values: list[float | None], base_lr: float, epoch0: int) -> str:
    match s["name"]:
        case "step":
            return f"step schedule: x{s['gamma']} every {s['step_size']} epochs"
        case "multistep":
            return f"multistep schedule: x{s['gamma']} at epochs {s['milestones']} (0-based)"
        case "exponential":
            return f"exponential schedule: x{s['gamma']} per epoch"
        case "cosine":
            return "cosine schedule: warmup" if epoch0 < s["warmup_epochs"] else "cosine schedule"
        case "plateau":
            return (f"plateau: {s['monitor']} did not improve for more than {s['patience']} "
                    f"epochs; x{s['factor']}")
        case "onecycle":
            return "onecycle schedule"
    return s["name"]
