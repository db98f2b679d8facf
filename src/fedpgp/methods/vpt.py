"""VPT (Jia et al., ECCV 2022) as the FedMGP authors run it federatedly: learnable vision prompt
tokens inside the frozen image tower, the frozen hand-crafted text "a photo of a {class}.", and
FedAvg of the prompts (docs/method.md section 14).

    V      (J x M x D_v)   V[0] appended before block 0, V[i] replacing it before block i
    logit(x, c) = exp(logit_scale) f_V(x) . z_C,c
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..prompts import PromptBank, normal_init
from .base import Tensors
from .encoders import GlobalPrompts, check_depth


class VPT(GlobalPrompts):
    name = "vpt"
    global_keys = ("vision",)

    def check_towers(self) -> None:
        settings = self.cfg.vpt
        check_depth("vpt.depth", settings.depth, self.tower.depth, "image", self.backbone.name)

    def init_global(self, width: int, generator: torch.Generator) -> Tensors:
        settings = self.cfg.vpt
        shape = (settings.depth, settings.length, self.tower.width)
        return {"vision": normal_init(shape, generator)}

    def vision_layers(self, params: Mapping[str, Tensor]) -> Tensor:
        return params["vision"]

    def class_features(self, params: Mapping[str, Tensor], bank: PromptBank) -> Tensor:
        """The frozen features of "a photo of a {class}.", computed once per class list (K
        clients' stacked tensors: the same for each)."""
        anchor = bank.anchor("paper")
        vision = params["vision"]
        return anchor if vision.dim() == 3 else anchor.expand(vision.shape[0], -1, -1)
