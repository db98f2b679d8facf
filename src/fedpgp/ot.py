"""Entropic optimal transport between an image's patches and a class's prompts (FedOTP).

For each problem (one image, one class) with similarities ``sim`` (M patches x N prompts) and
cost ``1 - sim``, the plan is T = diag(u) K diag(v) with K = exp(-cost / eps), found by scaling
iterations from u = v = 1 (METHOD.md section 5):

    cot (unbalanced):  a = 1/M, b = top_percent/N,  u = min(a / (K v), 1),  v = b / (K^T u)
    sinkhorn:          a = 1/M, b = 1/N,            u = a / (K v),          v = b / (K^T u)

i.e. u = min(1 / ((diag(1/a) K) v), 1) and v = 1 / ((diag(1/b) K^T) u) as in the authors' code.
A problem stops when the mean absolute change of its v is below ``thresh``, all of them after
``max_iter`` iterations. Every problem is solved on its own (a converged one is frozen while the
others go on), so a plan does not depend on which other images share its batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import FedOTPConfig
from .errors import ConfigError

OT_KINDS = ("cot", "sinkhorn")


def marginals(settings: FedOTPConfig, patches: int, prompts: int) -> tuple[float, float]:
    """The patch marginal a (each of M) and the prompt marginal b (each of N)."""
    if settings.ot not in OT_KINDS:
        raise ConfigError(f"fedotp.ot: expected one of {', '.join(OT_KINDS)}, got {settings.ot!r}")
    mass = settings.top_percent if settings.ot == "cot" else 1.0
    return 1.0 / patches, mass / prompts


@torch.no_grad()
def transport_plan(sim: Tensor, settings: FedOTPConfig) -> Tensor:
    """The plan T (..., M, N) for similarities ``sim`` (..., M, N), batched over the leading
    dimensions, without gradient, in the dtype of ``sim``.

    The iterations run in float64: at the authors' eps = 0.01, K = exp(-cost / eps) reaches
    exp(-200), which float32 flushes to zero (turning v into inf and T into NaN) for any
    similarity below about -0.03. A NaN plan (possible with a tiny eps) is a ConfigError.
    """
    a, b = marginals(settings, sim.shape[-2], sim.shape[-1])
    kernel = torch.exp((sim.detach().double() - 1.0) / settings.eps)
    kernel_t = kernel.transpose(-1, -2)
    u = kernel.new_ones(sim.shape[:-1])
    v = kernel.new_ones(sim.shape[:-2] + sim.shape[-1:])
    active = torch.ones((*sim.shape[:-2], 1), dtype=torch.bool, device=sim.device)
    for _ in range(settings.max_iter):
        u_next = a / (kernel @ v.unsqueeze(-1)).squeeze(-1)
        if settings.ot == "cot":
            u_next = u_next.clamp(max=1.0)
        v_next = b / (kernel_t @ u_next.unsqueeze(-1)).squeeze(-1)
        change = (v_next - v).abs().mean(dim=-1, keepdim=True)
        u = torch.where(active, u_next, u)
        v = torch.where(active, v_next, v)
        # A NaN change compares False and stops its problem; the check below reports it.
        active &= change >= settings.thresh
        if not bool(active.any()):
            break
    plan = u.unsqueeze(-1) * kernel * v.unsqueeze(-2)
    if not bool(torch.isfinite(plan).all()):
        raise ConfigError(
            f"FedOTP transport plan has NaN or inf entries (ot={settings.ot}, "
            f"eps={settings.eps}): K = exp(-cost / eps) underflows for this eps; raise "
            f"fedotp.eps, or change fedotp.thresh / fedotp.max_iter"
        )
    return plan.to(sim.dtype)
