"""PromptFL + FedProx: cross-entropy plus (mu / 2) * ||ctx - ctx_global||^2, mu = ``fedprox.mu``
(docs/method.md section 3)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ..prompts import PromptBank
from .promptfl import PromptFL


class FedProx(PromptFL):
    name = "fedprox"

    def loss(
        self,
        params: Mapping[str, Tensor],
        features: Tensor,
        labels: Tensor,
        bank: PromptBank,
        round_start: Mapping[str, Tensor],
    ) -> Tensor:
        ce = super().loss(params, features, labels, bank, round_start)
        proximal = (params["ctx"] - round_start["ctx"]).pow(2).sum()
        return ce + 0.5 * self.cfg.fedprox.mu * proximal

    def batched_losses(
        self,
        params: Mapping[str, Tensor],
        features: Tensor,
        labels: Tensor,
        mask: Tensor,
        bank: PromptBank,
        round_start: Mapping[str, Tensor],
    ) -> Tensor:
        ce = super().batched_losses(params, features, labels, mask, bank, round_start)
        proximal = (params["ctx"] - round_start["ctx"]).pow(2).flatten(1).sum(dim=1)
        return ce + 0.5 * self.cfg.fedprox.mu * proximal
