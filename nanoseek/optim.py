"""AdamW with low-precision moments (`--optim-states bf16`), as in the V3 recipe.

DeepSeek-V3 keeps master weights and gradients in fp32 but stores AdamW's first and second moments in BF16,
halving optimizer memory without observable loss. torch's AdamW keeps its states in the parameter dtype, so
this is a small AdamW whose update is computed in fp32 and whose moments are stored in `state_dtype`.
bf16 has fp32's exponent range, so tiny squared gradients do not underflow.
"""

from __future__ import annotations

import torch


class AdamWLowPrecisionStates(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, state_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                st["step"] += 1
                t = float(st["step"])
                g = p.grad.float()
                m = st["exp_avg"].float().lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * wd)
                denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1**t))
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch's loader casts floating-point states to the parameter dtype (fp32): cast the moments back, or
        # a resumed run would silently continue with fp32 moments (and an fp32-state checkpoint resumed with
        # `--optim-states bf16` would stay fp32)
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k] = st[k].to(self.state_dtype)

    def state_bytes(self) -> int:
        return sum(s[k].numel() * s[k].element_size() for s in self.state.values() for k in ("exp_avg", "exp_avg_sq"))
