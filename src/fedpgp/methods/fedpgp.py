"""FedPGP: global prompt sigma, personal low-rank U V, and the contrastive anchor loss.

Loss of client i on a batch (docs/method.md section 2):
    L = CE(scale * f(x) z_P^T, y) + mu * mean_c -log(e^{cos(z_C, z_G)/tau} /
                                                  (e^{cos(z_C, z_G)/tau} + e^{cos(z_G, z_P)/tau}))
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..prompts import PromptBank, normal_init, personalized_prompt
from .base import Method, Tensors, masked_cross_entropy


def contrastive_loss(z_c: Tensor, z_g: Tensor, z_p: Tensor, tau: float) -> Tensor:
    """Mean over classes of -log softmax of the positive pair (z_C, z_G) against the negative
    pair (z_G, z_P); all features L2-normalised, so a dot product is the cosine. Features
    (C, E) give a scalar; K clients' z_g and z_p (K, C, E) give their K losses."""
    positive = (z_c * z_g).sum(dim=-1) / tau
    negative = (z_g * z_p).sum(dim=-1) / tau
    return (torch.logsumexp(torch.stack([positive, negative]), dim=0) - positive).mean(dim=-1)


class FedPGP(Method):
    name = "fedpgp"
    global_keys = ("sigma",)
    personal_keys = ("U", "V")
    can_batch = True
    encodes_batched = True
    global_context = "sigma"

    def init_global(self, width: int, generator: torch.Generator) -> Tensors:
        return {"sigma": normal_init((self.cfg.n_ctx, width), generator)}

    def init_personal(self, width: int, generator: torch.Generator) -> Tensors:
        rank = self.cfg.fedpgp.rank
        return {
            "U": normal_init((self.cfg.n_ctx, rank), generator),
            "V": normal_init((rank, width), generator),
        }

    def prediction_context(self, params: Mapping[str, Tensor]) -> Tensor:
        return personalized_prompt(params["sigma"], params["U"], params["V"])

    def loss(
        self,
        params: Mapping[str, Tensor],
        features: Tensor,
        labels: Tensor,
        bank: PromptBank,
        round_start: Mapping[str, Tensor],
    ) -> Tensor:
        contexts = torch.stack([params["sigma"], self.prediction_context(params)])
        z_g, z_p = bank.encode(contexts)
        ce = F.cross_entropy(self.logits(features, z_p), labels)
        settings = self.cfg.fedpgp
        z_c = bank.anchor(settings.anchor)
        return ce + settings.mu * contrastive_loss(z_c, z_g, z_p, settings.tau)

    def batched_losses(
        self,
        params: Mapping[str, Tensor],
        features: Tensor,
        labels: Tensor,
        mask: Tensor,
        bank: PromptBank,
        round_start: Mapping[str, Tensor],
    ) -> Tensor:
        """:meth:`loss` of K clients: their 2K contexts (sigma_i, p_i) in one encoder call."""
        count = params["sigma"].shape[0]
        contexts = torch.cat([params["sigma"], self.prediction_context(params)])
        z_g, z_p = bank.encode(contexts).split(count)
        logits = self.logit_scale * torch.einsum("kbe,kce->kbc", features, z_p)
        ce = masked_cross_entropy(logits, labels, mask)
        settings = self.cfg.fedpgp
        z_c = bank.anchor(settings.anchor)
        return ce + settings.mu * contrastive_loss(z_c, z_g, z_p, settings.tau)
