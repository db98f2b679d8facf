"""What the methods with prompts or adapters inside the encoders share (VPT, IVLP, MaPLe, FedMGP,
pFedMMA; ../shared/BASELINES.md Part B): they read stems (the tokens entering the image tower's
first block that learns something, cached like any image feature) and run them through the
prompted image tower; their text prompts replace the first words of "a photo of a", and their
depths are checked against the towers when the method is created."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from ..backbone.prompted import PromptedImageTower
from ..errors import ConfigError
from ..prompts import PromptBank, PromptTemplate, normal_init
from .base import Method, masked_cross_entropy

if TYPE_CHECKING:
    from ..backbone import FrozenCLIP
    from ..config import RunConfig

# The authors' CTX_INIT: a text context of M <= 4 tokens starts as the embeddings of the first M
# words of this phrase, and the rest of it stays in the prompt before the class name.
PHOTO = "a photo of a"


def photo_tokens(backbone: FrozenCLIP) -> Tensor:
    """Token embeddings (n, D_t) of :data:`PHOTO`, without [SOS] and [EOT]."""
    ids, eot = backbone.tokenize([PHOTO])
    with torch.no_grad():
        return backbone.embed_tokens(ids[:, 1 : int(eot[0])])[0].detach().cpu()


def photo_template(length: int, key: str) -> PromptTemplate:
    """``[SOS] ctx_1 .. ctx_M <rest of "a photo of a"> {name}. [EOT]`` (with M = 2: "of a
    {}."); a context longer than the phrase (started at random) is followed by "{}."."""
    rest = PHOTO.split()[length:]
    return PromptTemplate(length, " ".join([*rest, "{}."]), key)


def text_context(backbone: FrozenCLIP, length: int, generator: torch.Generator) -> Tensor:
    """A first-block text context (M, D_t): the embeddings of the first M words of "a photo of
    a" when M is at most its length, else N(0, 0.02^2) (the authors' fall-back)."""
    words = photo_tokens(backbone)
    if length <= len(words):
        return words[:length].clone()
    return normal_init((length, backbone.text_width), generator)


def check_depth(key: str, depth: int, blocks: int, tower: str, model: str) -> None:
    """ConfigError naming ``key`` when ``depth`` blocks do not fit a tower of ``blocks``."""
    if depth > blocks:
        raise ConfigError(
            f"{key}: {depth} blocks, but the {tower} tower of '{model}' has {blocks} blocks"
        )


def share_of_depth(share: float, blocks: int) -> int:
    """``share`` of a tower's blocks, rounded, and at least one."""
    return max(1, round(share * blocks))


class EncoderMethod(Method):
    """A method whose learned tensors act inside the frozen encoders; created with a backbone,
    it checks its settings against the towers at once (:meth:`check_towers`)."""

    image_kind: ClassVar[str] = "stem"

    def __init__(
        self,
        cfg: RunConfig,
        logit_scale: float,
        embed_dim: int | None = None,
        backbone: FrozenCLIP | None = None,
    ) -> None:
        super().__init__(cfg, logit_scale, embed_dim, backbone)
        if backbone is not None:
            self.check_towers()

    def check_towers(self) -> None:
        """ConfigError for settings the backbone's towers cannot take (BackboneError for a
        tower that cannot take prompts at all)."""
        self.tower  # noqa: B018 (builds the tower, which refuses a non-standard one)

    @cached_property
    def tower(self) -> PromptedImageTower:
        """The prompted image tower (a BackboneError for a tower it cannot replay)."""
        return PromptedImageTower(self.backbone)

    @property
    def text_blocks(self) -> int:
        """Number of blocks of the text tower."""
        return len(self.backbone.text.transformer.resblocks)

    @staticmethod
    def layers(tensor: Tensor) -> tuple[Tensor, list[Tensor]]:
        """A stack of per-block prompts (J, M, D), or K clients' (K, J, M, D), as the first
        block's and the deep ones."""
        first, *deep = tensor.unbind(-3)
        return first, deep


class GlobalPrompts(EncoderMethod):
    """VPT, IVLP and MaPLe: prompts that are all GLOBAL, text ones through
    :meth:`class_features` and vision ones from :meth:`vision_layers` (J, M, D_v), each
    written so that K clients' stacked tensors give their K results; their clients can train
    in lockstep."""

    can_batch = True

    def encode_images(self, params: Mapping[str, Tensor], features: Tensor) -> Tensor:
        return self.tower.encode(features, *self.layers(self.vision_layers(params)))

    def batched_losses(
        self,
        params: Mapping[str, Tensor],
        features: Tensor,
        labels: Tensor,
        mask: Tensor,
        bank: PromptBank,
        round_start: Mapping[str, Tensor],
    ) -> Tensor:
        """:meth:`loss` of K clients: their K x B stems through the image tower in one pass
        (each image with its client's prompts), their K text prompts in one encoder call."""
        count, batch = features.shape[:2]
        first, deep = self.layers(self.vision_layers(params))
        per_image = [tokens.repeat_interleave(batch, dim=0) for tokens in (first, *deep)]
        images = self.tower.encode(features.flatten(0, 1), per_image[0], per_image[1:])
        text = self.class_features(params, bank).expand(count, -1, -1)
        logits = self.logit_scale * torch.einsum(
            "kbe,kce->kbc", images.view(count, batch, -1), text
        )
        return masked_cross_entropy(logits, labels, mask)
