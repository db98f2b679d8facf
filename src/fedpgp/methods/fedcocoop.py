"""FedCoCoOp: CoCoOp (Zhou et al., CVPR 2022) in federated form. A GLOBAL context and a GLOBAL
meta-network that shifts the context per image (docs/method.md section 11):

    pi(x)    = W2 relu(W1 f(x) + b1) + b2                 (E -> E / reduction -> D)
    ctx(x)   = ctx + pi(x)                                (the same shift for each of the M tokens)
    logit(x, c) = exp(logit_scale) f(x) . Enc(ctx(x), c)

with cross-entropy as the loss and the same logits for prediction. Each image has its own
context, so a batch of B images is B prefixes of one prefix-shared encoder call over the bank.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..prompts import PromptBank, linear_init, normal_init
from .base import Method, Tensors, masked_cross_entropy

# Images whose contexts are encoded in one call at prediction: bounds the (images x classes x
# tokens x width) activations of one call.
PREDICT_CHUNK = 64


class FedCoCoOp(Method):
    name = "fedcocoop"
    global_keys = ("ctx", "meta_w1", "meta_b1", "meta_w2", "meta_b2")
    can_batch = True

    def init_global(self, width: int, generator: torch.Generator) -> Tensors:
        embed = self.embed_dim
        hidden = max(embed // self.cfg.fedcocoop.reduction, 1)
        ctx = normal_init((self.cfg.n_ctx, width), generator)
        w1, b1 = linear_init(hidden, embed, generator)
        w2, b2 = linear_init(width, hidden, generator)
        return {"ctx": ctx, "meta_w1": w1, "meta_b1": b1, "meta_w2": w2, "meta_b2": b2}

    def image_contexts(self, params: Mapping[str, Tensor], features: Tensor) -> Tensor:
        """ctx + meta_net(f) for each image feature: (B, E) -> (B, M, D)."""
        hidden = F.relu(F.linear(features, params["meta_w1"], params["meta_b1"]))
        shift = F.linear(hidden, params["meta_w2"], params["meta_b2"])
        return params["ctx"].unsqueeze(0) + shift.unsqueeze(1)

    def image_logits(
        self, params: Mapping[str, Tensor], bank: PromptBank, features: Tensor
    ) -> Tensor:
        """exp(logit_scale) f(x) . Enc(ctx(x), c) for a batch (B, E) -> (B, C)."""
        text = bank.encode(self.image_contexts(params, features))
        return self.logit_scale * torch.einsum("be,bce->bc", features, text)

    def predict(self, params: Mapping[str, Tensor], bank: PromptBank, features: Tensor) -> Tensor:
        flat = features.reshape(-1, features.shape[-1])
        predicted = torch.cat(
            [
                self.image_logits(params, bank, chunk).argmax(dim=-1)
                for chunk in flat.split(PREDICT_CHUNK)
            ]
        )
        return predicted.reshape(features.shape[:-1])

    def loss(
        self,
        params: Mapping[str, Tensor],
        features: Tensor,
        labels: Tensor,
        bank: PromptBank,
        round_start: Mapping[str, Tensor],
    ) -> Tensor:
        return F.cross_entropy(self.image_logits(params, bank, features), labels)

    def batched_losses(
        self,
        params: Mapping[str, Tensor],
        features: Tensor,
        labels: Tensor,
        mask: Tensor,
        bank: PromptBank,
        round_start: Mapping[str, Tensor],
    ) -> Tensor:
        """:meth:`loss` of K clients: the K x B image contexts in one encoder call."""
        contexts = torch.func.vmap(self.image_contexts)(params, features)
        text = bank.encode(contexts.flatten(0, 1)).unflatten(0, contexts.shape[:2])
        logits = self.logit_scale * torch.einsum("kbe,kbce->kbc", features, text)
        return masked_cross_entropy(logits, labels, mask)
