"""PromptFL: one CoOp context, averaged by the server (FedAvg); cross-entropy only."""

from __future__ import annotations

import torch

from ..prompts import coop_context
from .base import Method, Tensors


class PromptFL(Method):
    name = "promptfl"
    global_keys = ("ctx",)
    can_batch = True
    encodes_batched = True

    def init_global(self, width: int, generator: torch.Generator) -> Tensors:
        return coop_context(self.cfg.n_ctx, width, generator)
