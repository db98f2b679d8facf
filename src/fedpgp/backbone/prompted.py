"""The frozen image tower with learnable tokens inside it (issue 14; ../shared/BASELINES.md
Part B, sections 0 and 4), for the methods that prompt the vision encoder (VPT, IVLP, MaPLe,
FedMGP).

What does not depend on any prompt is split off as the *stem*: the tokens entering block 0
(patch embedding, class token, positions and ``ln_pre``, as open_clip's ``_embeds`` computes
them), or, for a method whose first learned part sits in block k (pFedMMA's adapters), the tokens
entering block k. It is computed once per image and can be cached like any image feature; a step
runs only the blocks after it. Layer-0 prompts V_0 (M x D_v) are appended after the stem's
tokens, through ``ln_pre`` (per token, so ``ln_pre([X; V]) = [ln_pre X; ln_pre V]``) and without
positions; deep prompts V_i replace the last M tokens before block i = 1 .. J-1; an adapter of
block i adds its term to that block's output; pooling is ``ln_post`` of the class token times
``proj``. With no prompt and no adapter the result is open_clip's ``encode_image``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, Transformer, VisionTransformer
from torch import Tensor

from ..errors import BackboneError
from .frozen import Adapters, FrozenCLIP, check_adapters, run_block


def prompted_visual(backbone: FrozenCLIP) -> VisionTransformer:
    """The image tower of ``backbone`` when it is the standard open_clip ViT this module replays
    (class-token pooling, ``ln_post`` before pooling, batch-first residual attention blocks);
    a BackboneError naming the backbone otherwise, never a silent fallback."""
    visual = backbone.model.visual
    problems = []
    if not isinstance(visual, VisionTransformer):
        problems.append(f"its image tower is a {type(visual).__name__}, not a ViT")
    else:
        if visual.attn_pool is not None:
            problems.append("it pools images by attention")
        pool = getattr(visual, "pool_type", None)
        if pool != "tok":
            problems.append(f"it pools by {pool!r}, not the class token")
        if visual.final_ln_after_pool:
            problems.append("its final LayerNorm comes after pooling")
        transformer = visual.transformer
        if not isinstance(transformer, Transformer) or not transformer.batch_first:
            problems.append("its blocks are not a batch-first open_clip Transformer")
        elif not all(type(b) is ResidualAttentionBlock for b in transformer.resblocks):
            problems.append("its blocks are not standard residual attention blocks")
    if problems:
        raise BackboneError(
            f"model '{backbone.name}' cannot take prompts inside its image tower: "
            f"{'; '.join(problems)}"
        )
    return visual


class PromptedImageTower:
    """Image features of stems with layer-0 and deep prompts (see the module docstring)."""

    def __init__(self, backbone: FrozenCLIP) -> None:
        self.backbone = backbone
        self.visual = prompted_visual(backbone)
        self.blocks = list(self.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        """D_v: the width of the tokens and of every prompt."""
        return int(self.visual.class_embedding.shape[0])

    @property
    def depth(self) -> int:
        """Number of blocks: prompts can enter blocks 0 .. depth - 1."""
        return len(self.blocks)

    @torch.no_grad()
    def stem(self, images: Tensor, block: int = 0) -> Tensor:
        """Tokens (N, 1 + P, D_v) entering block ``block`` for transformed images (N, 3, H, W):
        frozen, so computed once per image."""
        self._check_block(block)
        with self.backbone.autocast():
            tokens = self.visual._embeds(images.to(self.backbone.device))
            for frozen in self.blocks[:block]:
                tokens = frozen(tokens)
        return tokens.float()

    def encode(
        self,
        stem: Tensor,
        prompts: Tensor | None = None,
        deep: Sequence[Tensor] = (),
        adapters: Adapters | None = None,
        start: int = 0,
    ) -> Tensor:
        """L2-normalised image features (N, E) of stems (N, 1 + P, D_v) entering block
        ``start``, float32 or the float16 of the feature cache.

        ``prompts`` (M, D_v), or (N, M, D_v) for a prompt per image, are appended before block
        0; ``deep[i - 1]`` (same shapes) replaces them before block i; ``adapters`` (block
        index -> adapter, blocks ``start`` onwards) add their term to their block's output.
        Gradients reach every prompt and adapter; the tower stays frozen.
        """
        adapters = adapters or {}
        self._check(prompts, deep, adapters, start)
        count = stem.shape[0]
        # A cached stem is float16; the blocks run in float32 (or under the backbone's autocast).
        x = stem.to(self.backbone.device, torch.float32)
        with self.backbone.autocast():
            if prompts is not None:
                appended = self._rows(self.visual.ln_pre(prompts), count).to(x.dtype)
                x = torch.cat([x, appended], dim=1)
            for index in range(start, self.depth):
                if 0 < index <= len(deep):
                    replaced = self._rows(deep[index - 1], count).to(x.dtype)
                    x = torch.cat([x[:, : -replaced.shape[1]], replaced], dim=1)
                x = run_block(self.blocks[index], x, adapters, index)
            pooled, _ = self.visual._pool(x)
            if self.visual.proj is not None:
                pooled = pooled @ self.visual.proj
        return F.normalize(pooled.float(), dim=-1)

    def _check_block(self, block: int) -> None:
        """ValueError unless a stem can enter block ``block`` of this tower."""
        if not 0 <= block < self.depth:
            raise ValueError(
                f"a stem entering block {block}: the image tower of '{self.backbone.name}' has "
                f"blocks 0 .. {self.depth - 1}"
            )

    def _check(
        self, prompts: Tensor | None, deep: Sequence[Tensor], adapters: Adapters, start: int
    ) -> None:
        """ValueError for prompts or adapters that this tower cannot take from block ``start``."""
        self._check_block(start)
        if start and (prompts is not None or deep):
            raise ValueError(f"prompts enter at block 0, the stem enters block {start}")
        if deep and prompts is None:
            raise ValueError("deep prompts replace layer-0 prompts: pass prompts too")
        if len(deep) >= self.depth:
            raise ValueError(
                f"{len(deep)} deep prompts need {len(deep) + 1} blocks, the image tower of "
                f"'{self.backbone.name}' has {self.depth}"
            )
        length = None if prompts is None else prompts.shape[-2]
        if any(tokens.shape[-2] != length for tokens in deep):
            raise ValueError(f"every deep prompt must have the {length} tokens it replaces")
        check_adapters(adapters, self.depth, start, tower="image")

    @staticmethod
    def _rows(tokens: Tensor, count: int) -> Tensor:
        """Prompt tokens as (N, M, D_v): shared by the batch, or already one set per image."""
        return tokens.expand(count, -1, -1) if tokens.dim() == 2 else tokens
