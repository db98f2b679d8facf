"""The FedOTP transport solver (docs/method.md section 5) against a plain-loop implementation."""

from __future__ import annotations

import math

import pytest
import torch

from fedpgp.errors import ConfigError
from fedpgp.methods.registry import FedOTPSettings
from fedpgp.ot import transport_plan

# Two problems (image, class) of M = 4 patches and N = 2 prompts, some similarities negative.
SIM = torch.tensor(
    [
        [[0.9, 0.1], [0.2, 0.7], [-0.3, 0.4], [0.5, 0.5]],
        [[0.1, -0.2], [0.6, 0.3], [0.3, 0.8], [-0.1, 0.0]],
    ],
    dtype=torch.float64,
)


def loop_plan(sim: list[list[float]], cfg: FedOTPSettings) -> list[list[float]]:
    """One problem's plan, written out entry by entry from the specification."""
    m, n = len(sim), len(sim[0])
    a = 1.0 / m
    b = (cfg.top_percent if cfg.ot == "cot" else 1.0) / n
    K = [[math.exp(-(1.0 - sim[i][j]) / cfg.eps) for j in range(n)] for i in range(m)]
    u, v = [1.0] * m, [1.0] * n
    for _ in range(cfg.max_iter):
        u = [a / sum(K[i][j] * v[j] for j in range(n)) for i in range(m)]
        if cfg.ot == "cot":
            u = [min(x, 1.0) for x in u]
        new_v = [b / sum(K[i][j] * u[i] for i in range(m)) for j in range(n)]
        change = sum(abs(new_v[j] - v[j]) for j in range(n)) / n
        v = new_v
        if change < cfg.thresh:
            break
    return [[u[i] * K[i][j] * v[j] for j in range(n)] for i in range(m)]


def full(shape: tuple[int, ...], value: float) -> torch.Tensor:
    return torch.full(shape, value, dtype=torch.float64)


def reference(sim: torch.Tensor, cfg: FedOTPSettings) -> torch.Tensor:
    return torch.tensor([loop_plan(problem.tolist(), cfg) for problem in sim], dtype=sim.dtype)


CONVERGED = {"eps": 0.1, "thresh": 1e-12, "max_iter": 5000}


def test_cot_rows_at_most_one_over_m_columns_top_percent_and_matches_loop() -> None:
    cfg = FedOTPSettings(ot="cot", top_percent=0.8, **CONVERGED)
    plan = transport_plan(SIM, cfg)
    m, n = SIM.shape[-2:]
    assert (plan.sum(dim=-1) <= 1.0 / m + 1e-5).all()
    torch.testing.assert_close(plan.sum(dim=-2), full((2, n), 0.8 / n), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan, reference(SIM, cfg), atol=1e-10, rtol=1e-8)


def test_sinkhorn_marginals_exact_and_matches_loop() -> None:
    cfg = FedOTPSettings(ot="sinkhorn", **CONVERGED)
    plan = transport_plan(SIM, cfg)
    m, n = SIM.shape[-2:]
    torch.testing.assert_close(plan.sum(dim=-1), full((2, m), 1.0 / m), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(dim=-2), full((2, n), 1.0 / n), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan, reference(SIM, cfg), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("ot", ["cot", "sinkhorn"])
def test_authors_settings_match_loop_in_float32(ot: str) -> None:
    # eps = 0.01 puts K near exp(-130) for similarity -0.3, below float32's range: the solver
    # must still agree with the float64 loop (and give a float32 plan for float32 input).
    cfg = FedOTPSettings(ot=ot)
    plan = transport_plan(SIM.float(), cfg)
    assert plan.dtype == torch.float32
    torch.testing.assert_close(plan, reference(SIM, cfg).float(), atol=1e-7, rtol=1e-5)


def test_each_problem_is_solved_on_its_own() -> None:
    # Early stopping is per problem: a plan does not depend on the rest of its batch.
    cfg = FedOTPSettings(ot="cot", eps=0.1, thresh=1e-6, max_iter=500)
    together = transport_plan(SIM, cfg)
    alone = torch.stack([transport_plan(problem, cfg) for problem in SIM])
    torch.testing.assert_close(together, alone, atol=1e-14, rtol=1e-12)
    batched = transport_plan(SIM.reshape(1, 2, 4, 2).expand(3, 2, 4, 2), cfg)
    torch.testing.assert_close(batched, together.expand(3, 2, 4, 2), atol=1e-14, rtol=1e-12)


def test_plan_carries_no_gradient() -> None:
    sim = SIM.clone().requires_grad_(True)
    plan = transport_plan(sim, FedOTPSettings())
    assert not plan.requires_grad


def test_nan_plan_is_an_error_naming_the_keys() -> None:
    # With eps = 1e-4 every entry of prompt 1 (similarity 0, cost 1) is exp(-10000) = 0 even
    # in float64: its column of K is empty, v = inf and the plan NaN.
    sim = torch.tensor([[[0.99, 0.0], [0.98, 0.0]]])
    with pytest.raises(ConfigError) as raised:
        transport_plan(sim, FedOTPSettings(eps=1e-4))
    message = str(raised.value)
    for key in ("fedotp.eps", "fedotp.thresh", "fedotp.max_iter"):
        assert key in message
