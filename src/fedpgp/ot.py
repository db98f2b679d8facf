"""Entropic optimal transport between an image's patches and a class's prompts (FedOTP).

For each problem (one image, one class) with similarities ``sim`` (M patches x N prompts) and
cost ``1 - sim``, the plan is T = diag(u) K diag(v) with K = exp(-cost / eps), found by scaling
iterations from u = v = 1 (docs/method.md section 5):

    cot (unbalanced):  a = 1/M, b = top_percent/N,  u = min(a / (K v), 1),  v = b / (K^T u)
    sinkhorn:          a = 1/M, b = 1/N,            u = a / (K v),          v = b / (K^T u)

i.e. u = min(1 / ((diag(1/a) K) v), 1) and v = 1 / ((diag(1/b) K^T) u) as in the authors' code.
A problem stops when the mean absolute change of its prompt-side scaling v (cot) or of its
patch-side scaling u (sinkhorn, against the previous iteration's u, 1 at the start) is below
``thresh``, as in the authors' code; all of them stop after ``max_iter`` iterations. Every problem
is solved on its own (a converged one is frozen while the others go on), so a plan does not
depend on which other images share its batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import ConfigError
from .methods.registry import FedOTPSettings

OT_KINDS = ("cot", "sinkhorn")


def marginals(settings: FedOTPSettings, patches: int, prompts: int) -> tuple[float, float]:
    """The patch marginal a (each of M) and the prompt marginal b (each of N)."""
    if settings.ot not in OT_KINDS:
        raise ConfigError(f"fedotp.ot: expected one of {', '.join(OT_KINDS)}, got {settings.ot!r}")
    mass = settings.top_percent if settings.ot == "cot" else 1.0
    return 1.0 / patches, mass / prompts


def _patch_scaling(kernel: Tensor, v: Tensor, a: float, cot: bool, out: Tensor) -> Tensor:
    """u = a / (K v), capped at 1 for COT, into ``out`` (M, R): kernel (N, M, R), v (N, 1, R)."""
    # a is folded into the small v, so the (M, R) pass is one reciprocal.
    scaled = v / a
    torch.mul(kernel[0], scaled[0], out=out)
    for k_n, v_n in zip(kernel[1:], scaled[1:], strict=True):
        out.addcmul_(k_n, v_n)
    u = out.reciprocal_()
    return u.clamp_(max=1.0) if cot else u


@torch.no_grad()
def transport_plan(sim: Tensor, settings: FedOTPSettings) -> Tensor:
    """The plan T (..., M, N) for similarities ``sim`` (..., M, N), batched over the leading
    dimensions, without gradient, in the dtype of ``sim``."""
    *batch, patches, prompts = sim.shape
    columns = sim.reshape(-1, patches, prompts).permute(2, 1, 0)
    plan = transport_plan_columns(columns, settings)
    return plan.permute(2, 1, 0).reshape(*batch, patches, prompts)


@torch.no_grad()
def transport_plan_columns(sim: Tensor, settings: FedOTPSettings) -> Tensor:
    """The plans (N, M, R) of R problems laid out problem-minor, ``sim`` (N prompts, M patches,
    R problems): every operation of an iteration then runs along the contiguous problems, where
    a problem-major layout would reduce over rows of only M or N entries.

    The iterations run in float64: at the authors' eps = 0.01, K = exp(-cost / eps) reaches
    exp(-200), which float32 flushes to zero (turning v into inf and T into NaN) for any
    similarity below about -0.03, and within one problem the scalings span more than float32's
    range (measured on the world: v up to 1e58, u down to 1e-60), so no rescaling rescues it. A
    NaN plan (still possible with a tiny eps) is a ConfigError.
    """
    prompts, patches, count = sim.shape
    a, b = marginals(settings, patches, prompts)
    cot = settings.ot == "cot"
    # Contiguous, so that the problems are the fast axis whatever view ``sim`` is.
    kernel = torch.exp((sim.detach().double().contiguous() - 1.0) / settings.eps)
    v = kernel.new_ones(prompts, 1, count)
    # u of an iteration is a function of the previous v: keeping that v (v_prev) instead of u
    # makes freezing a converged problem cheap; u is rebuilt from it at the end.
    v_prev = v
    # Sinkhorn's stopping rule compares u with the u of the iteration before.
    u_last = None if cot else kernel.new_ones(patches, count)
    active = torch.ones(1, count, dtype=torch.bool, device=sim.device)
    # Until a problem stops, no iteration needs to select between old and new values.
    everyone = True
    # The iterations write into buffers made once (allocating them per iteration costs 40%);
    # u alternates between two, so that the last iteration's u is intact for sinkhorn's rule.
    product = torch.empty_like(kernel)
    u_buffers = [kernel.new_empty(patches, count), kernel.new_empty(patches, count)]
    for iteration in range(settings.max_iter):
        u = _patch_scaling(kernel, v, a, cot, u_buffers[iteration % 2])
        v_next = torch.mul(kernel, u, out=product).sum(dim=1, keepdim=True)
        v_next = v_next.reciprocal_().mul_(b)
        if u_last is None:
            change = (v_next - v).abs_().mean(dim=0)
        else:
            change = (u - u_last).abs_().mean(dim=0, keepdim=True)
            u_last = u if everyone else torch.where(active, u, u_last)
        if everyone:
            v_prev, v = v, v_next
        else:
            v_prev = torch.where(active, v, v_prev)
            v = torch.where(active, v_next, v)
        # A NaN change compares False and stops its problem; the check below reports it.
        active &= change >= settings.thresh
        still = int(active.sum())
        if still == 0:
            break
        everyone = still == count
    plan = kernel * _patch_scaling(kernel, v_prev, a, cot, product[0]) * v
    if not bool(torch.isfinite(plan).all()):
        raise ConfigError(
            f"FedOTP transport plan has NaN or inf entries (ot={settings.ot}, "
            f"eps={settings.eps}): K = exp(-cost / eps) underflows for this eps; raise "
            f"fedotp.eps, or change fedotp.thresh / fedotp.max_iter"
        )
    return plan.to(sim.dtype)
