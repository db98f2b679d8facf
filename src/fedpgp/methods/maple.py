"""MaPLe (Khattak et al., CVPR 2023) as the FedMGP authors run it federatedly: text prompts in
blocks 0 .. J-1 of the text tower, each projected into the image tower's block of the same
index, every tensor averaged by the server (docs/method.md section 14).

    T  (J x M x D_t)           T[0] the context of "[SOS] T[0] of a {class}. [EOT]" (starting
                               as the embeddings of "a photo"), T[i] replacing it before block i
    V_i = T[i] W_i^T + b_i     (M x D_v): V_0 appended before image block 0, V_i replacing it
                               before block i
    logit(x, c) = exp(logit_scale) f_V(x) . Enc_T(c)

The image loss reaches T through the projections. The deep projections W_1 .. W_{J-1} start as
copies of one initialisation, as the authors' deep copies of one nn.Linear do.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..prompts import PromptBank, PromptTemplate, linear_init, normal_init
from .base import Tensors
from .encoders import GlobalPrompts, check_depth, photo_template, share_of_depth, text_context

# The authors' depth, 9 of ViT-B/16's 12 blocks, as a share of a tower's blocks.
DEPTH_SHARE = 9 / 12


class MaPLe(GlobalPrompts):
    name = "maple"
    global_keys = ("text", "proj_w", "proj_b")

    @property
    def template(self) -> PromptTemplate:
        return photo_template(self.cfg.maple.length, "maple.length")

    @property
    def depth(self) -> int:
        """J: ``maple.depth``, or three quarters of the shallower tower."""
        chosen = self.cfg.maple.depth
        if chosen is not None:
            return chosen
        return share_of_depth(DEPTH_SHARE, min(self.text_blocks, self.tower.depth))

    def check_towers(self) -> None:
        model = self.backbone.name
        check_depth("maple.depth", self.depth, self.text_blocks, "text", model)
        check_depth("maple.depth", self.depth, self.tower.depth, "image", model)

    def init_global(self, width: int, generator: torch.Generator) -> Tensors:
        length, depth, vision = self.cfg.maple.length, self.depth, self.tower.width
        first = text_context(self.backbone, length, generator)
        deep = normal_init((depth - 1, length, width), generator)
        w0, b0 = linear_init(vision, width, generator)
        w, b = linear_init(vision, width, generator)
        return {
            "text": torch.cat([first.unsqueeze(0), deep]),
            "proj_w": torch.cat([w0.unsqueeze(0), w.expand(depth - 1, -1, -1)]),
            "proj_b": torch.cat([b0.unsqueeze(0), b.expand(depth - 1, -1)]),
        }

    def vision_layers(self, params: Mapping[str, Tensor]) -> Tensor:
        """V_i = T[i] W_i^T + b_i for every block i."""
        return params["text"] @ params["proj_w"].transpose(-1, -2) + params["proj_b"].unsqueeze(-2)

    def class_features(self, params: Mapping[str, Tensor], bank: PromptBank) -> Tensor:
        return bank.encode(*self.layers(params["text"]))
