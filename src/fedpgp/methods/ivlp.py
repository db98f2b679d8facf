"""IVLP (independent vision-language prompts; Rasheed et al., CVPR 2023) as the FedMGP authors
run it federatedly: a text prompt and a vision prompt, each with its own depth, both averaged
by the server (docs/method.md section 14).

    T  (J_t x M_t x D_t)   T[0] the context of "[SOS] T[0] of a {class}. [EOT]" (starting as
                           the embeddings of "a photo"), T[i] replacing it before text block i
    V  (J_v x M_v x D_v)   V[0] appended before image block 0, V[i] replacing it before block i
    logit(x, c) = exp(logit_scale) f_V(x) . Enc_T(c)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..prompts import PromptBank, PromptTemplate, normal_init
from .base import Tensors
from .encoders import GlobalPrompts, check_depth, photo_template, text_context


class IVLP(GlobalPrompts):
    name = "ivlp"
    global_keys = ("text", "vision")

    @property
    def template(self) -> PromptTemplate:
        return photo_template(self.cfg.ivlp.text_length, "ivlp.text_length")

    def check_towers(self) -> None:
        settings, model = self.cfg.ivlp, self.backbone.name
        check_depth("ivlp.text_depth", settings.text_depth, self.text_blocks, "text", model)
        check_depth("ivlp.vision_depth", settings.vision_depth, self.tower.depth, "image", model)

    def init_global(self, width: int, generator: torch.Generator) -> Tensors:
        """The first text context from "a photo", every other prompt N(0, 0.02^2)."""
        settings = self.cfg.ivlp
        first = text_context(self.backbone, settings.text_length, generator)
        deep = normal_init((settings.text_depth - 1, settings.text_length, width), generator)
        vision = (settings.vision_depth, settings.vision_length, self.tower.width)
        return {
            "text": torch.cat([first.unsqueeze(0), deep]),
            "vision": normal_init(vision, generator),
        }

    def vision_layers(self, params: Mapping[str, Tensor]) -> Tensor:
        return params["vision"]

    def class_features(self, params: Mapping[str, Tensor], bank: PromptBank) -> Tensor:
        return bank.encode(*self.layers(params["text"]))
