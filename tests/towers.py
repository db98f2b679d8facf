"""Reference computations for the methods with prompts or adapters inside the encoders, written
from ../shared/BASELINES.md Part B: open_clip's towers run block by block, one class or one
batch of images at a time, with the prompts and adapters put where the specification says."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fedpgp.backbone import FrozenCLIP

# Block index -> a function of the block's input and the block, added to its output.
Adapters = dict[int, Callable]


def image_features(
    backbone: FrozenCLIP,
    images: Tensor,
    prompts: Tensor | None = None,
    deep: Sequence[Tensor] = (),
    adapters: Adapters | None = None,
) -> Tensor:
    """Normalised features (N, E) of images (N, 3, H, W): patches, class token and positions,
    the prompts (M, D_v) or one set per image (N, M, D_v) appended without positions,
    ``ln_pre`` over the whole sequence, the last M tokens replaced by deep[i - 1] before block
    i, adapter i added to block i's output, ``ln_post`` of the class token times ``proj``."""
    visual = backbone.model.visual
    adapters = adapters or {}
    count = images.shape[0]
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(count, 1, -1), x], dim=1)
    x = x + visual.positional_embedding
    if prompts is not None:
        x = torch.cat([x, prompts.expand(count, -1, -1)], dim=1)
    x = visual.ln_pre(x)
    for index, block in enumerate(visual.transformer.resblocks):
        if 1 <= index <= len(deep):
            length = deep[index - 1].shape[-2]
            x = torch.cat([x[:, :-length], deep[index - 1].expand(count, -1, -1)], dim=1)
        out = block(x)
        x = out + adapters[index](x, block) if index in adapters else out
    return F.normalize(visual.ln_post(x[:, 0]) @ visual.proj, dim=-1)


def text_features(
    backbone: FrozenCLIP,
    names: Sequence[str],
    context: Tensor,
    suffix: str,
    deep: Sequence[Tensor] = (),
    adapters: Adapters | None = None,
) -> Tensor:
    """Normalised features (C, E), one class at a time: ``[SOS] context <suffix with the
    name> [EOT]`` through the text blocks, positions 1 .. M of deep[i - 1] written over before
    block i, adapter i added to block i's output, the EOT row of ``ln_final`` projected."""
    text = backbone.text
    adapters = adapters or {}
    rows = []
    for name in names:
        ids, eot = backbone.tokenize([suffix.format(name)])
        embedded = backbone.embed_tokens(ids)[0]
        length = int(eot[0]) + 1 + context.shape[0]
        x = torch.cat([embedded[:1], context, embedded[1:]])[:length]
        x = (x + text.positional_embedding[:length]).unsqueeze(0)
        mask = text.attn_mask[:length, :length]
        for index, block in enumerate(text.transformer.resblocks):
            if 1 <= index <= len(deep):
                tokens = deep[index - 1].unsqueeze(0)
                x = torch.cat([x[:, :1], tokens, x[:, 1 + tokens.shape[1] :]], dim=1)
            out = block(x, attn_mask=mask)
            x = out + adapters[index](x, block) if index in adapters else out
        rows.append(F.normalize(text.ln_final(x)[0, -1] @ text.text_projection, dim=-1))
    return torch.stack(rows)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over images of logsumexp(logits) - logit of the label, image by image."""
    total = torch.zeros(())
    for row, label in zip(logits, labels, strict=True):
        total = total + torch.logsumexp(row, dim=0) - row[int(label)]
    return total / len(labels)


def relative_error(ours: Tensor, reference: Tensor) -> float:
    """|ours - reference| / |reference| (Frobenius norms)."""
    return float((ours - reference).norm() / reference.norm())


def assert_gradients_match(ours: dict[str, Tensor], reference: dict[str, Tensor]) -> None:
    """Every gradient of ``reference`` is non-zero and ``ours`` equals it (relative 1e-4)."""
    assert set(ours) == set(reference)
    for key, expected in reference.items():
        assert expected is not None and float(expected.norm()) > 0, key
        assert relative_error(ours[key], expected) < 1e-4, (
            key,
            relative_error(ours[key], expected),
        )
