"""Early stopping and LR schedules: metric sequences in, decisions out; schedules checked
against torch.optim.lr_scheduler where the rules coincide."""
import math

import pytest
import torch

from daemon import policies
from daemon.spec import validate

INF = math.inf


def schedule(value) -> dict:
    """A normalised schedule dict, with defaults filled, as the worker sees it."""
    spec = validate({"train_data_path": "x", "target_column": "t", "learning_rate_scheduler": value})
    return spec.learning_rate_scheduler.model_dump()


@pytest.mark.parametrize("values, kwargs, expected", [
    # (best_value, best_epoch, wait, stop)
    ([1.0, 0.9, 0.8], dict(patience=2), (0.8, 3, 0, False)),
    ([1.0, 1.1, 1.2], dict(patience=2), (1.0, 1, 2, True)),
    ([1.0, 1.1], dict(patience=2), (1.0, 1, 1, False)),
    ([1.0, 1.0], dict(patience=1), (1.0, 1, 1, True)),          # equal is not better
    ([1.0, 0.95], dict(patience=1, min_delta=0.1), (1.0, 1, 1, True)),   # not by more than min_delta
    ([1.0, 0.85], dict(patience=1, min_delta=0.1), (0.85, 2, 0, False)),
    ([1.0, 2.0], dict(patience=0), (1.0, 1, 1, True)),
    ([5.0], dict(patience=0), (5.0, 1, 0, False)),               # never stops on the first epoch
    ([1.0, 0.9, 0.95, 0.99], dict(patience=2, start_from_epoch=2), (0.95, 3, 1, False)),
    # improving epochs that miss the baseline keep counting, but (as in Keras) only a
    # non-improving epoch can stop the run
    ([1.0, 0.9, 0.8], dict(patience=2, baseline=0.5), (0.8, 3, 3, False)),
    ([1.0, 0.9, 0.8, 0.85], dict(patience=2, baseline=0.5), (0.8, 3, 4, True)),
    ([None, None, 1.0], dict(patience=1), (1.0, 3, 0, False)),   # epochs without a value are skipped
    ([0.5, 0.7, 0.6], dict(patience=1, mode="max"), (0.7, 2, 1, True)),
])
def test_early_stopping_follows_keras_rules(values, kwargs, expected):
    kwargs.setdefault("mode", "min")
    s = policies.early_stopping(values, **kwargs)
    assert (s.best_value, s.best_epoch, s.wait, s.stop) == expected


def test_early_stopping_decides_each_epoch_alone_on_its_history():
    """Asked again after every epoch, as the worker does: the first True ends the run."""
    values = [1.0, 0.9, 0.95, 0.96, 0.97, 0.5]
    stops = [policies.early_stopping(values[:n], patience=3, mode="min").stop for n in range(1, 7)]
    assert stops == [False, False, False, False, True, False]


def test_mode_auto():
    assert policies.resolve_mode("val_loss", "auto") == "min"
    assert policies.resolve_mode("val_accuracy", "auto") == "max"
    assert policies.resolve_mode("val_r2", "auto") == "max"
    assert policies.resolve_mode("val_accuracy", "min") == "min"


def torch_lrs(make, epochs, base=0.1, metrics=None):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = make(opt)
    out = []
    for e in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step(metrics[e]) if metrics is not None else sched.step()
    return out


@pytest.mark.parametrize("value, make", [
    ("step", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=30, gamma=0.1)),
    ({"name": "step", "step_size": 3, "gamma": 0.5},
     lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
    ({"name": "multistep", "milestones": [2, 5, 9], "gamma": 0.3},
     lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 5, 9], gamma=0.3)),
    ({"name": "exponential", "gamma": 0.9},
     lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)),
    ({"name": "cosine", "t_max": 40, "eta_min": 0.001},
     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=40, eta_min=0.001)),
])
def test_epoch_schedules_match_torch(value, make):
    s = schedule(value)
    ours = [policies.epoch_lr(s, 0.1, e, 40, []) for e in range(40)]
    assert ours == pytest.approx(torch_lrs(make, 40), rel=1e-9)


def test_cosine_warmup_matches_linear_then_cosine():
    s = schedule({"name": "cosine", "warmup_epochs": 4, "warmup_start_factor": 0.25})
    ours = [policies.epoch_lr(s, 0.1, e, 20, []) for e in range(20)]
    warm = torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=4), 4)
    cos = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=16), 16)
    assert ours == pytest.approx(warm + cos, rel=1e-9)


@pytest.mark.parametrize("params", [
    {},
    {"patience": 1, "factor": 0.5},
    {"patience": 0, "cooldown": 2, "min_lr": 0.02},
    {"patience": 1, "threshold": 0.05, "threshold_mode": "abs"},
    {"patience": 1, "mode": "max", "monitor": "val_accuracy"},
])
def test_plateau_matches_torch(params):
    metrics = [1.0, 0.9, 0.9, 0.91, 0.89, 0.95, 0.95, 0.95, 0.7, 0.71, 0.72, 0.73, 0.74, 0.75, 0.76] * 2
    s = schedule({"name": "plateau", **params})
    ours = [policies.epoch_lr(s, 0.1, e, len(metrics), metrics) for e in range(len(metrics))]
    kw = {k: v for k, v in params.items() if k != "monitor"}
    theirs = torch_lrs(lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, **kw),
                       len(metrics), metrics=metrics)
    assert ours == pytest.approx(theirs, rel=1e-12)


@pytest.mark.parametrize("params", [{}, {"three_phase": True}, {"anneal_strategy": "linear", "pct_start": 0.5}])
def test_onecycle_matches_torch_per_step(params):
    s = schedule({"name": "onecycle", **params})
    epochs, spe = 4, 7
    ours = []
    for e in range(epochs):
        ours += policies.step_lrs(s, 0.1, e, 0, spe, spe, epochs, [])
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    kw = {k: v for k, v in params.items()}
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=epochs * spe,
                                                cycle_momentum=False, **kw)
    theirs = []
    for _ in range(epochs * spe):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_step_lrs_from_the_middle_of_an_epoch_equal_the_whole_epochs_tail():
    """A resumed chunk asks for steps 3..6 of epoch 1; it must get what a straight run gets."""
    s = schedule("onecycle")
    whole = policies.step_lrs(s, 0.1, 1, 0, 7, 7, 4, [])
    assert policies.step_lrs(s, 0.1, 1, 3, 4, 7, 4, []) == whole[3:]


def test_best_epoch_picks_the_first_of_equals():
    assert policies.best_epoch([0.5, 0.4, 0.4, None], "min") == (2, 0.4)
    assert policies.best_epoch([None, None], "min") == (None, None)
    assert policies.best_epoch([0.5, 0.9, 0.7], "max") == (2, 0.9)
