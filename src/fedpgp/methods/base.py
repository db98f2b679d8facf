"""What every method declares: its GLOBAL tensors (uploaded to the server), its PERSONAL tensors
(never leave the client), its local loss and the context it predicts with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import RunConfig
from ..prompts import PromptBank

Tensors = dict[str, Tensor]


class Method:
    """A federated prompt-learning algorithm over a frozen CLIP."""

    name: ClassVar[str]
    global_keys: ClassVar[tuple[str, ...]] = ()
    personal_keys: ClassVar[tuple[str, ...]] = ()
    trains: ClassVar[bool] = True
    needs_patches: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig, logit_scale: float) -> None:
        self.cfg = cfg
        self.logit_scale = logit_scale

    def init_global(self, width: int, generator: torch.Generator) -> Tensors:
        """The server's initial GLOBAL tensors."""
        return {}

    def init_personal(self, width: int, generator: torch.Generator) -> Tensors:
        """A client's initial PERSONAL tensors."""
        return {}

    def prediction_context(self, params: Mapping[str, Tensor]) -> Tensor:
        """The context (M x D) this method classifies with: the CoOp context by default."""
        return params["ctx"]

    def class_features(self, params: Mapping[str, Tensor], bank: PromptBank) -> Tensor:
        """Normalised text features (C x E) of every class of ``bank``."""
        return bank.encode(self.prediction_context(params))

    def logits(self, features: Tensor, text_features: Tensor) -> Tensor:
        """exp(logit_scale) * cos(image, class) for a batch of image features."""
        return self.logit_scale * features @ text_features.t()

    def predict(self, params: Mapping[str, Tensor], bank: PromptBank, features: Tensor) -> Tensor:
        """Predicted class index (into ``bank``) for each image feature (N x E, or V x N x E)."""
        return self.logits(features, self.class_features(params, bank)).argmax(dim=-1)

    def loss(
        self,
        params: Mapping[str, Tensor],
        features: Tensor,
        labels: Tensor,
        bank: PromptBank,
        round_start: Mapping[str, Tensor],
    ) -> Tensor:
        """The local training loss of one batch. ``round_start`` holds the GLOBAL tensors as the
        client received them this round."""
        logits = self.logits(features, self.class_features(params, bank))
        return F.cross_entropy(logits, labels)
