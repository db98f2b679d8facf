"""FedOTP (Li et al., CVPR 2024): a GLOBAL and a PERSONAL CoOp context, matched to an image's
patch features by optimal transport (docs/method.md section 5).

Prompt 0 (``ctx_global``) is averaged by the server, prompt 1 (``ctx_local``) never leaves the
client. For image x and class c, sim[m, n] = cos(patch_m(x), t_{n,c}); the plan T (M x N) comes
from :func:`fedpgp.ot.transport_plan` without gradient, and

    logit(x, c) = exp(logit_scale) * sum_{m,n} T[m, n] * sim[m, n]

with cross-entropy as the loss and the same logits for prediction. The image features this
method receives are patch features (n, P, E) (see ``needs_patches``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..ot import transport_plan
from ..prompts import normal_init
from .base import Method, Tensors

# Entries of the kernel (images x classes x patches x prompts) per transport batch: bounds the
# memory of a whole test set's plans (8 MiB of float64 per batch); results do not depend on it.
KERNEL_ENTRIES_PER_BATCH = 1 << 20


class FedOTP(Method):
    name = "fedotp"
    global_keys = ("ctx_global",)
    personal_keys = ("ctx_local",)
    global_context = "ctx_global"
    needs_patches = True

    def init_global(self, width: int, generator: torch.Generator) -> Tensors:
        return {"ctx_global": normal_init((self.cfg.n_ctx, width), generator)}

    def init_personal(self, width: int, generator: torch.Generator) -> Tensors:
        return {"ctx_local": normal_init((self.cfg.n_ctx, width), generator)}

    def prediction_context(self, params: Mapping[str, Tensor]) -> Tensor:
        """Both contexts (2, M, D): prompt 0 global, prompt 1 personal."""
        return torch.stack([params["ctx_global"], params["ctx_local"]])

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
        sim = torch.einsum("bpe,nce->bcpn", patches.to(text_features.dtype), text_features)
        plan = transport_plan(sim, self.cfg.fedotp)
        return self.logit_scale * (plan * sim).sum(dim=(-2, -1))
