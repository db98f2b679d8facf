"""pFedMMA (ICLR 2026): adapters in the top blocks of both towers, of which only a projection
shared by the two modalities is GLOBAL (docs/method.md section 16).

For adapted block l of a tower of width D (the top ``blocks`` blocks of each tower, paired from
the top), with the block's frozen ln_1 and input x:

    u = Up_l( relu( S_l( relu( Down_l( ln_1(x) ) ) ) ) )   (D -> d -> d -> D, d = ``pfedmma.dim``)
    x_{l+1} = Block_l(x) + s u                                s = ``pfedmma.scale``

S_l (GLOBAL, n_i-weighted mean) is shared by the text and the image block l; Down and Up are
PERSONAL, one set per tower. The scale acts on the forward value only: the adapter's own
gradient is taken as if s were 1, while the gradient it passes back into x is multiplied by s
(the authors' gradient-scaling layer). The text is the fixed "a photo of a {class}.".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone.frozen import Adapters
from ..prompts import PromptBank, PromptTemplate
from ..seeding import torch_generator
from .base import Tensors
from .encoders import PHOTO, EncoderMethod, check_depth, photo_tokens, share_of_depth

# The authors' adapted blocks, 4 .. 11 of ViT-B/16's 12, as a share of a tower's blocks.
BLOCK_SHARE = 8 / 12
TOWERS = ("text", "vision")
PARTS = ("down_w", "down_b", "up_w", "up_b")


def kaiming_fan_out(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu") of (..., out, in)
    weights: N(0, 2 / out)."""
    return torch.randn(shape, generator=generator) * math.sqrt(2.0 / shape[-2])


def scaled_adapter(
    x: Tensor,
    block: nn.Module,
    down: tuple[Tensor, Tensor],
    shared: tuple[Tensor, Tensor],
    up: tuple[Tensor, Tensor],
    scale: float,
) -> Tensor:
    """s u for block input ``x``, in float32 whatever the autocast (s u is about 1e-3 of x, at
    or below bf16's resolution), with the authors' gradient scaling."""
    with torch.autocast(x.device.type, enabled=False):
        # Forward value x; gradient into x multiplied by s.
        x = scale * x.float() + (1.0 - scale) * x.float().detach()
        hidden = F.relu(F.linear(block.ln_1(x), *down))
        hidden = F.relu(F.linear(hidden, *shared))
        u = F.linear(hidden, *up)
        # Forward value s u; gradient into u as if s were 1.
        return scale * u.detach() + (u - u.detach())


class PFedMMA(EncoderMethod):
    name = "pfedmma"
    global_keys = ("shared_w", "shared_b")
    personal_keys = tuple(f"{tower}_{part}" for tower in TOWERS for part in PARTS)
    # Every evaluation encodes the test images through the adapted blocks per client: the
    # final round only.
    eval_every = None

    @property
    def blocks(self) -> int:
        """n, the adapted blocks of each tower: ``pfedmma.blocks``, or two thirds of the
        shallower tower."""
        chosen = self.cfg.pfedmma.blocks
        if chosen is not None:
            return chosen
        return share_of_depth(BLOCK_SHARE, min(self.text_blocks, self.tower.depth))

    @property
    def first_blocks(self) -> dict[str, int]:
        """The first adapted block of each tower: the adapters sit in its top n blocks."""
        return {"text": self.text_blocks - self.blocks, "vision": self.tower.depth - self.blocks}

    @property
    def image_kind(self) -> str:  # type: ignore[override]
        """The tokens entering the first adapted image block, computed once per image."""
        first = self.first_blocks["vision"]
        return "stem" if first == 0 else f"stem@{first}"

    @property
    def template(self) -> PromptTemplate:
        """The fixed prompt "a photo of a {class}.": its tokens are the (frozen) context."""
        return PromptTemplate(len(self.context), "{}.", f'pfedmma\'s prompt "{PHOTO} {{}}."')

    @cached_property
    def context(self) -> Tensor:
        """The frozen token embeddings of "a photo of a" (n, D_t)."""
        return photo_tokens(self.backbone).to(self.backbone.device)

    def check_towers(self) -> None:
        model = self.backbone.name
        check_depth("pfedmma.blocks", self.blocks, self.text_blocks, "text", model)
        check_depth("pfedmma.blocks", self.blocks, self.tower.depth, "image", model)

    def init_global(self, width: int, generator: torch.Generator) -> Tensors:
        dim, blocks = self.cfg.pfedmma.dim, self.blocks
        return {
            "shared_w": kaiming_fan_out((blocks, dim, dim), generator),
            "shared_b": torch.zeros(blocks, dim),
        }

    def init_personal(self, width: int, generator: torch.Generator) -> Tensors:
        """Down and up projections of each tower, kaiming (fan out, relu), biases 0."""
        dim, blocks = self.cfg.pfedmma.dim, self.blocks
        tensors = {}
        for tower, size in (("text", width), ("vision", self.tower.width)):
            tensors[f"{tower}_down_w"] = kaiming_fan_out((blocks, dim, size), generator)
            tensors[f"{tower}_down_b"] = torch.zeros(blocks, dim)
            tensors[f"{tower}_up_w"] = kaiming_fan_out((blocks, size, dim), generator)
            tensors[f"{tower}_up_b"] = torch.zeros(blocks, size)
        return tensors

    def initial_personal(self, width: int, client_id: int) -> Tensors:
        """The same starting adapters for every client, as the authors' round 0 loads one
        initial state into every client."""
        return self.init_personal(width, torch_generator(self.cfg.seed, "init", "pfedmma"))

    def adapters(self, params: Mapping[str, Tensor], tower: str) -> Adapters:
        """The adapters of ``tower`` (text or vision) by block index."""
        scale, first = self.cfg.pfedmma.scale, self.first_blocks[tower]

        def adapter(k: int):
            down = (params[f"{tower}_down_w"][k], params[f"{tower}_down_b"][k])
            shared = (params["shared_w"][k], params["shared_b"][k])
            up = (params[f"{tower}_up_w"][k], params[f"{tower}_up_b"][k])
            return lambda x, block: scaled_adapter(x, block, down, shared, up, scale)

        return {first + k: adapter(k) for k in range(self.blocks)}

    def encode_images(self, params: Mapping[str, Tensor], features: Tensor) -> Tensor:
        start = self.first_blocks["vision"]
        return self.tower.encode(features, adapters=self.adapters(params, "vision"), start=start)

    def class_features(self, params: Mapping[str, Tensor], bank: PromptBank) -> Tensor:
        return bank.encode(self.context, adapters=self.adapters(params, "text"))
