"""FedOTP (Li et al., CVPR 2024): a GLOBAL and a PERSONAL CoOp context, matched to an image's
patch features by optimal transport (docs/method.md section 5).

Prompt 0 (``ctx_global``) is averaged by the server, prompt 1 (``ctx_local``) never leaves the
client. For image x and class c, sim[m, n] = cos(patch_m(x), t_{n,c}); the plan T (M x N) comes
from :func:`fedpgp.ot.transport_plan` without gradient, and

    logit(x, c) = exp(logit_scale) * sum_{m,n} T[m, n] * sim[m, n]

with cross-entropy as the loss and the same logits for prediction. The image features this
method receives are patch features (n, P, E) (``image_kind``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..ot import transport_plan_columns
from ..prompts import PromptBank, normal_init
from .base import Method, Tensors, masked_cross_entropy

# Entries of the kernel (images x classes x patches x prompts) per transport batch: 2 MiB of
# float64, so that a batch's iterations run in the processor's cache (1.4x faster on the world's
# test sets than 8 MiB); results do not depend on it.
KERNEL_ENTRIES_PER_BATCH = 1 << 18


class FedOTP(Method):
    name = "fedotp"
    global_keys = ("ctx_global",)
    personal_keys = ("ctx_local",)
    global_context = "ctx_global"
    image_kind = "patches"
    can_batch = True
    encodes_batched = True

    def init_global(self, width: int, generator: torch.Generator) -> Tensors:
        return {"ctx_global": normal_init((self.cfg.n_ctx, width), generator)}

    def init_personal(self, width: int, generator: torch.Generator) -> Tensors:
        return {"ctx_local": normal_init((self.cfg.n_ctx, width), generator)}

    def prediction_context(self, params: Mapping[str, Tensor]) -> Tensor:
        """Both contexts (2, M, D): prompt 0 global, prompt 1 personal; K clients' stacked
        tensors give (K, 2, M, D)."""
        return torch.stack([params["ctx_global"], params["ctx_local"]], dim=-3)

    def batched_class_features(self, params: Mapping[str, Tensor], bank: PromptBank) -> Tensor:
        """Both prompts' class features (K, 2, C, E) of K clients, in one encoder call."""
        contexts = self.prediction_context(params)
        return bank.encode(contexts.flatten(0, 1)).unflatten(0, contexts.shape[:2])

    def logits(self, features: Tensor, text_features: Tensor) -> Tensor:
        """OT logits (n, C) of patch features (n, P, E) against the prompts' text features
        (N, C, E)."""
        prompts, classes = text_features.shape[:2]
        per_batch = max(1, KERNEL_ENTRIES_PER_BATCH // (classes * features.shape[1] * prompts))
        return torch.cat(
            [self._transport_logits(part, text_features) for part in features.split(per_batch)]
        )

    def _transport_logits(self, patches: Tensor, text_features: Tensor) -> Tensor:
        # Patch features may be stored in half precision; the similarities are computed in the
        # text features' precision.
        sim = torch.einsum("bpe,nce->npbc", patches.to(text_features.dtype), text_features)
        return self._ot_logits(sim)

    def _ot_logits(self, sim: Tensor) -> Tensor:
        """OT logits (...) of similarities laid out as the solver wants them (prompts, patches,
        ...): every trailing position is one (image, class) problem."""
        problems = sim.shape[2:]
        flat = sim.reshape(*sim.shape[:2], -1)
        plan = transport_plan_columns(flat, self.cfg.fedotp)
        return self.logit_scale * (plan * flat).sum(dim=(0, 1)).view(problems)

    def batched_losses(
        self,
        params: Mapping[str, Tensor],
        features: Tensor,
        labels: Tensor,
        mask: Tensor,
        bank: PromptBank,
        round_start: Mapping[str, Tensor],
    ) -> Tensor:
        """:meth:`loss` of K clients: their 2K contexts in one encoder call, and every client's
        (image, class) transport problems in one solve."""
        text = self.batched_class_features(params, bank)
        sim = torch.einsum("kbpe,knce->npkbc", features.to(text.dtype), text)
        return masked_cross_entropy(self._ot_logits(sim), labels, mask)
