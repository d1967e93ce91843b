"""Adam and AdamW for the PyTorch engine, without torch.optim's Optimizer class.

Every method of `torch.optim.Optimizer` (its constructor's `add_param_group` included) is
wrapped so that torch.compile skips it, and the first call of any of them imports
`torch._dynamo`: 1-2 s of a worker's start-up, for a module that a job which compiles nothing
never uses.

`FusedAdam` runs the kernel that `torch.optim.Adam(fused=True)` / `AdamW(fused=True)` run
(`torch._fused_adam_` / `torch._fused_adamw_`, after the same `+1` of each step count), on state
created the same way, so its updates are those of torch.optim bit for bit (tested), and its
`state_dict()` has torch.optim's layout, so a checkpoint written by either loads in the other.

It covers what the engine asks of Adam: fused (CPU or CUDA), one parameter group of one device
and dtype, no amsgrad, no gradient scaler. An fp16 run keeps torch.optim (its GradScaler steps a
torch.optim optimizer), as does any other optimiser.
"""
from collections.abc import Iterable

import torch

# the keys of a torch.optim.Adam(fused=True) parameter group, in its order, as its
# state_dict() writes them (a test compares them with the installed torch's)
GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
              "differentiable", "fused", "decoupled_weight_decay")
HYPER = ("lr", "betas", "eps", "weight_decay")  # what a loaded state_dict sets


def usable(params: list[torch.Tensor]) -> bool:
    """Whether `FusedAdam` can take these parameters: floating point, one device and dtype,
    a device with the fused kernel."""
    return (bool(params) and len({(p.device, p.dtype) for p in params}) == 1
            and params[0].is_floating_point() and params[0].device.type in ("cpu", "cuda"))


class FusedAdam:
    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, decoupled_weight_decay: bool):
        self.params = list(params)
        if not usable(self.params):
            raise ValueError("FusedAdam needs floating-point parameters on one CPU or CUDA device")
        group = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                 "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                 "differentiable": False, "fused": True,
                 "decoupled_weight_decay": decoupled_weight_decay}
        self.param_groups = [{"params": self.params, **group}]
        self.state: dict[int, dict[str, torch.Tensor]] = {}  # by parameter index, as torch packs it

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        params, grads, avgs, sqs, steps = [], [], [], [], []
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
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
        """Loads a state_dict of this class or of torch.optim.Adam/AdamW over the same parameters."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            saved = sum(len(g["params"]) for g in groups)
            raise ValueError(f"the saved optimizer state has {saved} parameters in {len(groups)} "
                             f"group(s); this model has {len(self.params)} in one")
        index = {saved: i for i, saved in enumerate(groups[0]["params"])}
        state = {}
        for saved, values in state_dict["state"].items():
            p = self.params[index[saved]]
            step = values["step"]
            step = step if torch.is_tensor(step) else torch.tensor(float(step))
            state[index[saved]] = {
                "step": step.to(dtype=torch.float32, device=p.device),
                "exp_avg": values["exp_avg"].to(dtype=p.dtype, device=p.device),
                "exp_avg_sq": values["exp_avg_sq"].to(dtype=p.dtype, device=p.device)}
        for key in HYPER:
            self.param_groups[0][key] = tuple(groups[0][key]) if key == "betas" else groups[0][key]
        self.state = state
