"""Muon (Keller Jordan et al., 2024): momentum, then the nearest semi-orthogonal matrix (a quintic
Newton-Schulz iteration) as the update of each 2-D weight matrix.

The update rule is `torch.optim.Muon`'s; same-shape matrices are orthogonalised in one batched
product, and the iteration runs in float32 off CUDA (docs/DESIGN.md §11, "Muon").
"""

from collections import defaultdict

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# torch.optim.Muon's `adjust_lr_fn` conventions: the step size of a (rows, cols) matrix at rate lr.
ADJUST_LR_FNS = {"original": lambda lr, rows, cols: lr * max(1.0, rows / cols) ** 0.5,
                 "match_rms_adamw": lambda lr, rows, cols: lr * 0.2 * max(rows, cols) ** 0.5}


def orthogonalize(G, steps=5, eps=1e-7, coefficients=NS_COEFFICIENTS):
    """Approximately U V^T for G = U S V^T, for a (..., rows, cols) batch of matrices."""
    a, b, c = coefficients
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide orientation: X X^T is the smaller product
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, ns_steps=5, eps=1e-7,
                 adjust_lr_fn="original"):
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r}: use one of {', '.join(ADJUST_LR_FNS)}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        eps=eps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            by_shape = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[(tuple(p.shape), p.device, p.dtype)].append(p)
            for (shape, _, _), params in by_shape.items():
                grads = [p.grad for p in params]
                bufs = []
                for p, g in zip(params, grads):
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    bufs.append(state["momentum_buffer"])
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, grads)
                updates = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs
                ortho = orthogonalize(torch.stack(updates), group["ns_steps"], group["eps"])
                if wd:
                    torch._foreach_mul_(params, 1 - lr * wd)
                step = ADJUST_LR_FNS[group["adjust_lr_fn"]](lr, *shape)
                torch._foreach_add_(params, list(ortho.to(params[0].dtype).unbind(0)), alpha=-step)
        return loss
