"""engines.optim against torch.optim: the same updates bit for bit, the same state_dict,
checkpoints that load either way; and a worker's engine that never imports torch._dynamo."""
import copy
import subprocess
import sys

import pytest
import torch

from engines.optim import RMSprop, SGD, FusedAdam
from tests.conftest import REPO

ADAM = {"lr": 3e-3, "betas": (0.9, 0.99), "eps": 1e-7, "weight_decay": 0.01}
# name: (torch.optim's, ours), each a function of the parameters
CASES = {
    "adam": (lambda ps: torch.optim.Adam(ps, fused=True, **ADAM),
             lambda ps: FusedAdam(ps, decoupled_weight_decay=False, **ADAM)),
    "adamw": (lambda ps: torch.optim.AdamW(ps, fused=True, **ADAM),
              lambda ps: FusedAdam(ps, decoupled_weight_decay=True, **ADAM)),
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05, weight_decay=0.01),
            lambda ps: SGD(ps, lr=0.05, weight_decay=0.01)),
    "sgd-momentum": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
                     lambda ps: SGD(ps, lr=0.05, momentum=0.9)),
    "sgd-nesterov": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
                     lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=0.01, eps=1e-7, weight_decay=0.01),
                lambda ps: RMSprop(ps, lr=0.01, eps=1e-7, weight_decay=0.01)),
    "rmsprop-momentum": (lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.9),
                         lambda ps: RMSprop(ps, lr=0.01, momentum=0.9)),
}


def pair(case: str):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    twin = copy.deepcopy(net)
    theirs, ours = CASES[case]
    return (net, theirs(net.parameters())), (twin, ours(twin.parameters()))


def train(net, opt, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        x = torch.randn(8, 5, generator=gen)
        opt.zero_grad(set_to_none=True)
        net(x).pow(2).mean().backward()
        opt.step()
        if i == steps // 2:
            opt.param_groups[0]["lr"] = 1e-3  # what the worker's LR schedule does between steps


def same_state(a: dict, b: dict) -> bool:
    """Equal states: the parameter groups key for key in one order, every tensor equal in
    value and dtype."""
    return (a["param_groups"] == b["param_groups"] and list(a["state"]) == list(b["state"])
            and [list(g) for g in a["param_groups"]] == [list(g) for g in b["param_groups"]]
            and all(a["state"][i].keys() == b["state"][i].keys()
                    and all(torch.equal(a["state"][i][k], b["state"][i][k])
                            and a["state"][i][k].dtype == b["state"][i][k].dtype for k in a["state"][i])
                    for i in a["state"]))


@pytest.mark.parametrize("case", CASES)
def test_the_same_updates_and_state_as_torch_optim_bit_for_bit(case):
    (net, reference), (twin, ours) = pair(case)
    train(net, reference, 25, seed=1)
    train(twin, ours, 25, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))
    assert same_state(reference.state_dict(), ours.state_dict())
    assert reference.state_dict()["state"] or case == "sgd"  # plain SGD keeps none


@pytest.mark.parametrize("case", CASES)
def test_checkpoints_load_either_way_and_go_on_identically(tmp_path, case):
    """A checkpoint written by an older epochd (torch.optim) resumes in ours, and the other
    way round (an fp16 run steps torch.optim), through torch.save and a weights-only load."""
    (net, reference), (twin, ours) = pair(case)
    train(net, reference, 10, seed=1)
    train(twin, ours, 10, seed=1)
    torch.save({"a": reference.state_dict(), "b": ours.state_dict()}, tmp_path / "opt.pt")
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)
    (net2, reference2), (twin2, ours2) = pair(case)
    net2.load_state_dict(net.state_dict())
    twin2.load_state_dict(twin.state_dict())
    ours2.load_state_dict(saved["a"])       # torch.optim's state into ours
    reference2.load_state_dict(saved["b"])  # ours into torch.optim
    train(net, reference, 10, seed=2)
    train(twin2, ours2, 10, seed=2)
    train(net2, reference2, 10, seed=2)
    for other in (twin2, net2):
        assert all(torch.equal(a, b) for a, b in zip(net.parameters(), other.parameters()))
    assert same_state(reference.state_dict(), ours2.state_dict())


@pytest.mark.parametrize("case", CASES)
def test_a_state_for_another_model_is_refused(case):
    (_, reference), _ = pair(case)
    smaller = CASES[case][1](torch.nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="4 parameters in 1 group"):
        smaller.load_state_dict(reference.state_dict())


def test_the_seed_models_training_never_imports_torch_dynamo(tmp_path):
    """What the start-up saving rests on: building the engine, training, checkpointing and
    resuming with each optimiser leave torch._dynamo (1-2 s to import) unloaded."""
    script = f"""
import sys
from pathlib import Path
from daemon import spec as specs
from engines import load_engine
from engines.data import prepare
Engine = load_engine("pytorch")
for name in ("adam", "adamw", "sgd", "rmsprop", {{"name": "sgd", "momentum": 0.9}}):
    raw = {{"train_data_path": "examples/data/wine.csv", "target_column": "cultivar", "batch_size": 16,
           "devices": "cpu", "optimizer": name, "algorithm_params": {{"dropout_rate": 0.2}}}}
    spec = specs.normalise(specs.validate(raw), job_id="j", base_dir=Path("."),
                           spool_root=Path({str(tmp_path / "spool")!r}), allow_roots=[])
    data = prepare(spec)
    engine = Engine(spec, data, 1)
    engine.start_epoch(1, 0)
    engine.train_steps([0.01] * 3)
    engine.save_checkpoint(Path({str(tmp_path)!r}) / "c.pt")
    again = Engine(spec, data, 1)
    again.load_checkpoint(Path({str(tmp_path)!r}) / "c.pt")
    again.start_epoch(1, 3)
    again.train_steps([0.01] * 2)
    engine.evaluate()
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False"
