"""CLIP zero-shot: the hand-crafted prompt "a photo of a {class}.", nothing trained."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ..prompts import PromptBank
from .base import Method


class ZeroShot(Method):
    name = "zeroshot"
    trains = False

    def class_features(self, params: Mapping[str, Tensor], bank: PromptBank) -> Tensor:
        return bank.anchor("paper")
