"""FedOTP's balanced Sinkhorn stops per problem on the patch-side scaling (docs/method.md
section 5)."""

from __future__ import annotations

import math

import torch

from fedpgp.methods.registry import FedOTPSettings
from fedpgp.ot import transport_plan


def sinkhorn_loop(sim: list[list[float]], cfg: FedOTPSettings) -> tuple[list[list[float]], int]:
    """One problem's balanced plan and the iterations it ran, written out from the
    specification: stop when the mean change of u (1 before the first iteration) is below
    thresh, or after max_iter iterations."""
    m, n = len(sim), len(sim[0])
    K = [[math.exp(-(1.0 - sim[i][j]) / cfg.eps) for j in range(n)] for i in range(m)]
    u, v = [1.0] * m, [1.0] * n
    iterations = 0
    for _ in range(cfg.max_iter):
        iterations += 1
        new_u = [(1.0 / m) / sum(K[i][j] * v[j] for j in range(n)) for i in range(m)]
        v = [(1.0 / n) / sum(K[i][j] * new_u[i] for i in range(m)) for j in range(n)]
        change = sum(abs(new_u[i] - u[i]) for i in range(m)) / m
        u = new_u
        if change < cfg.thresh:
            break
    return [[u[i] * K[i][j] * v[j] for j in range(n)] for i in range(m)], iterations


def test_sinkhorn_stops_per_problem_on_the_patch_side() -> None:
    generator = torch.Generator().manual_seed(0)
    # Six images x three classes, 5 patches x 2 prompts; the similarity spread sets how fast a
    # problem converges, so some stop before max_iter and some do not.
    spread = torch.tensor([0.05, 0.2, 0.6]).view(1, 3, 1, 1)
    sim = (torch.rand(6, 3, 5, 2, generator=generator, dtype=torch.float64) - 0.5) * spread
    cfg = FedOTPSettings(ot="sinkhorn", eps=0.1, thresh=1e-4, max_iter=20)
    solved = [sinkhorn_loop(problem.tolist(), cfg) for problem in sim.flatten(0, 1)]
    iterations = [count for _, count in solved]
    assert min(iterations) < cfg.max_iter and cfg.max_iter in iterations
    expected = torch.tensor([plan for plan, _ in solved], dtype=torch.float64).view(6, 3, 5, 2)
    torch.testing.assert_close(transport_plan(sim, cfg), expected, atol=1e-10, rtol=0)
