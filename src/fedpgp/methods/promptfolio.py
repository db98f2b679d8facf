"""PromptFolio (Pan et al., NeurIPS 2024): a GLOBAL and a PERSONAL CoOp context whose class
features are mixed as a portfolio (docs/method.md section 9).

    z_c = (1 - theta) Enc(ctx_global, c) + theta Enc(ctx_local, c)      (not renormalised)
    logit(x, c) = exp(logit_scale) f(x) . z_c

with cross-entropy as the loss and the same logits for prediction. The server averages
``ctx_global``; ``ctx_local`` never leaves the client.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..prompts import PromptBank, normal_init
from ..seeding import torch_generator
from .base import Method, Tensors


class PromptFolio(Method):
    name = "promptfolio"
    global_keys = ("ctx_global",)
    personal_keys = ("ctx_local",)
    global_context = "ctx_global"
    can_batch = True
    encodes_batched = True

    def init_global(self, width: int, generator: torch.Generator) -> Tensors:
        return {"ctx_global": normal_init((self.cfg.n_ctx, width), generator)}

    def init_personal(self, width: int, generator: torch.Generator) -> Tensors:
        return {"ctx_local": normal_init((self.cfg.n_ctx, width), generator)}

    def initial_personal(self, width: int, client_id: int) -> Tensors:
        """The same starting local prompt for every client, as the authors' clients all start
        from one draw of both prompts."""
        return self.init_personal(width, torch_generator(self.cfg.seed, "init", "folio-local"))

    def class_features(self, params: Mapping[str, Tensor], bank: PromptBank) -> Tensor:
        """(1 - theta) z_G + theta z_L from one encoding of both contexts."""
        theta = self.cfg.promptfolio.theta
        z_global, z_local = bank.encode(torch.stack([params["ctx_global"], params["ctx_local"]]))
        return (1.0 - theta) * z_global + theta * z_local

    def batched_class_features(self, params: Mapping[str, Tensor], bank: PromptBank) -> Tensor:
        """The mix (K, C, E) of K clients, their 2K contexts in one encoder call."""
        theta = self.cfg.promptfolio.theta
        count = params["ctx_global"].shape[0]
        contexts = torch.cat([params["ctx_global"], params["ctx_local"]])
        z_global, z_local = bank.encode(contexts).split(count)
        return (1.0 - theta) * z_global + theta * z_local
