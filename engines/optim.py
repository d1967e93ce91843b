"""The PyTorch engine's optimisers: torch.optim's algorithms without torch.optim's classes.

Every method of `torch.optim.Optimizer` (its constructor's `add_param_group` included) is
wrapped so that torch.compile skips it, and the first call of any of them imports
`torch._dynamo`: 1-2 s of a worker's start-up, for a module that a job which compiles nothing
never uses.

Each class here runs the very code torch.optim's class runs, on state created the same way, so
its updates are torch.optim's bit for bit (tested), and its `state_dict()` has torch.optim's
layout, so a checkpoint written by either loads in the other:
- `FusedAdam`: the kernel `torch.optim.Adam(fused=True)` / `AdamW(fused=True)` run
  (`torch._fused_adam_` / `torch._fused_adamw_`, after the same `+1` of each step count);
- `SGD` and `RMSprop`: torch.optim's functional `sgd` / `rmsprop`, with the arguments their
  classes pass (torch picks the single-tensor or foreach implementation as it would).

They cover what the engine asks: one parameter group of one device and dtype, no gradient
scaler. An fp16 run keeps torch.optim (its GradScaler steps a torch.optim optimiser).
"""
from collections.abc import Iterable

import torch
from torch.optim.optimizer import _get_scalar_dtype
from torch.optim.rmsprop import rmsprop
from torch.optim.sgd import sgd


def usable(params: list[torch.Tensor]) -> bool:
    """Whether these classes can take these parameters: floating point, one device and dtype,
    a device with the fused Adam kernel."""
    return (bool(params) and len({(p.device, p.dtype) for p in params}) == 1
            and params[0].is_floating_point() and params[0].device.type in ("cpu", "cuda"))


class _Optimizer:
    """One parameter group; state by parameter index, as torch.optim's state_dict packs it.

    `group`: the class's parameter group without "params", in torch.optim's key order (a test
    compares the keys with the installed torch's). `hyper`: the keys a loaded state_dict sets.
    `step_on_device`: whether the "step" count lives on the parameters' device (fused kernels)
    or on the CPU (torch.optim's other implementations, not capturable)."""
    hyper: tuple[str, ...] = ()
    step_on_device = False

    def __init__(self, params: Iterable[torch.Tensor], group: dict):
        self.params = list(params)
        if not usable(self.params):
            raise ValueError(f"{type(self).__name__} needs floating-point parameters on one CPU "
                             "or CUDA device")
        self.param_groups = [{"params": self.params, **group}]
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def _with_grads(self) -> list[tuple[int, torch.Tensor]]:
        return [(i, p) for i, p in enumerate(self.params) if p.grad is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def state_dict(self) -> dict:
        """torch.optim's layout: {"state": {index: {...}}, "param_groups": [{...,
        "params": [0, 1, ...]}]}."""
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": dict(self.state),
                "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict of this class or of its torch.optim counterpart over the same
        parameters, cast as torch.optim casts it."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            saved = sum(len(g["params"]) for g in groups)
            raise ValueError(f"the saved optimizer state has {saved} parameters in {len(groups)} "
                             f"group(s); this model has {len(self.params)} in one")
        index = {saved: i for i, saved in enumerate(groups[0]["params"])}
        state = {}
        for saved, values in state_dict["state"].items():
            p = self.params[index[saved]]
            state[index[saved]] = {k: self._cast(k, v, p) for k, v in values.items()}
        for key in self.hyper:
            self.param_groups[0][key] = tuple(groups[0][key]) if key == "betas" else groups[0][key]
        self.state = state

    def _cast(self, key: str, value, p: torch.Tensor) -> torch.Tensor:
        if key == "step":
            value = value if torch.is_tensor(value) else torch.tensor(float(value))
            if self.step_on_device:
                return value.to(dtype=torch.float32, device=p.device)
            return value
        return value.to(dtype=p.dtype, device=p.device)


class FusedAdam(_Optimizer):
    hyper = ("lr", "betas", "eps", "weight_decay")
    step_on_device = True

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, decoupled_weight_decay: bool):
        super().__init__(params, {
            "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
            "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
            "differentiable": False, "fused": True, "decoupled_weight_decay": decoupled_weight_decay})

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        params, grads, avgs, sqs, steps = [], [], [], [], []
        for i, p in self._with_grads():
            state = self.state.get(i)
            if state is None:  # created at the first step, as torch.optim does
                state = self.state[i] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            params.append(p)
            grads.append(p.grad)
            avgs.append(state["exp_avg"])
            sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        torch._foreach_add_(steps, 1)
        kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        beta1, beta2 = group["betas"]
        kernel(params, grads, avgs, sqs, [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
               beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
               grad_scale=None, found_inf=None)


class SGD(_Optimizer):
    hyper = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum requires a momentum")
        super().__init__(params, {
            "lr": lr, "momentum": momentum, "dampening": 0, "weight_decay": weight_decay,
            "nesterov": nesterov, "maximize": False, "foreach": None, "differentiable": False,
            "fused": None})

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        live = self._with_grads()
        momentum = group["momentum"] != 0
        buffers = [self.state.get(i, {}).get("momentum_buffer") for i, _ in live] if momentum else []
        sgd([p for _, p in live], [p.grad for _, p in live], buffers,
            weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
            dampening=group["dampening"], nesterov=group["nesterov"], maximize=False,
            has_sparse_grad=False, foreach=None, fused=None, grad_scale=None, found_inf=None)
        if momentum:  # sgd() creates a buffer at a parameter's first step
            for (i, _), buffer in zip(live, buffers, strict=True):
                self.state[i] = {"momentum_buffer": buffer}


class RMSprop(_Optimizer):
    hyper = ("lr", "momentum", "alpha", "eps", "weight_decay")

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, momentum: float = 0.0,
                 eps: float = 1e-8, weight_decay: float = 0.0, alpha: float = 0.99):
        super().__init__(params, {
            "lr": lr, "momentum": momentum, "alpha": alpha, "eps": eps, "centered": False,
            "weight_decay": weight_decay, "capturable": False, "foreach": None,
            "maximize": False, "differentiable": False})

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        params, grads, square_avgs, buffers, steps = [], [], [], [], []
        for i, p in self._with_grads():
            state = self.state.get(i)
            if state is None:  # created at the first step, as torch.optim does
                state = self.state[i] = {
                    "step": torch.zeros((), dtype=_get_scalar_dtype()),
                    "square_avg": torch.zeros_like(p, memory_format=torch.preserve_format)}
                if group["momentum"] > 0:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            square_avgs.append(state["square_avg"])
            steps.append(state["step"])
            if group["momentum"] > 0:
                buffers.append(state["momentum_buffer"])
        rmsprop(params, grads, square_avgs, [], buffers, steps, foreach=None, maximize=False,
                differentiable=False, capturable=False, has_complex=False, lr=group["lr"],
                alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
                momentum=group["momentum"], centered=False)
