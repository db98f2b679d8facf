"""Local CoOp: every client trains its own context; nothing is shared."""

from __future__ import annotations

import torch

from ..prompts import coop_context
from .base import Method, Tensors


class Local(Method):
    name = "local"
    personal_keys = ("ctx",)
    can_batch = True
    encodes_batched = True

    def init_personal(self, width: int, generator: torch.Generator) -> Tensors:
        return coop_context(self.cfg.n_ctx, width, generator)
