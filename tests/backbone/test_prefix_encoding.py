"""The prefix-shared text encoder equals the plain full-length computation (features and
gradients), for class names of different token lengths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fedpgp.backbone import BackboneSpec, FrozenCLIP
from fedpgp.prompts import PromptBank

# One, two, three and many tokens: four suffix lengths, so four groups in the shared encoder.
NAMES = [
    "red",
    "golden retriever",
    "sea",
    "a very long class name with many words",
    "great white shark",
]
N_CTX = 4


@pytest.fixture(scope="module")
def tiny() -> FrozenCLIP:
    return FrozenCLIP.load(BackboneSpec("fedpgp-tiny", None))


def full_length(backbone: FrozenCLIP, names: list[str], contexts: Tensor) -> Tensor:
    """The authors' computation: every prompt through all context_length positions."""
    placeholder = " ".join(["X"] * contexts.shape[1])
    ids, eot = backbone.tokenize([f"{placeholder} {name}." for name in names])
    prompts = backbone.embed_tokens(ids).unsqueeze(0).repeat(contexts.shape[0], 1, 1, 1)
    prompts[:, :, 1 : 1 + contexts.shape[1]] = contexts.unsqueeze(1)
    x = prompts.flatten(0, 1) + backbone.text.positional_embedding
    x = backbone.text.transformer(x, attn_mask=backbone.text.attn_mask)
    x = backbone.text.ln_final(x)[torch.arange(x.shape[0]), eot.repeat(contexts.shape[0])]
    x = x @ backbone.text.text_projection
    return F.normalize(x, dim=-1).view(contexts.shape[0], len(names), -1)


def contexts(count: int, width: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Larger than the N(0, 0.02^2) initialisation, so that the context matters to the output.
    return torch.randn(count, N_CTX, width, generator=generator).requires_grad_(True)


def test_bank_uses_the_shared_prefix_with_one_group_per_suffix_length(tiny: FrozenCLIP) -> None:
    bank = PromptBank(tiny, NAMES, N_CTX)
    assert bank._shared is not None
    lengths = [group.length for group in bank._shared.groups]
    assert len(lengths) == len(set(lengths)) >= 4


@pytest.mark.parametrize("count", [1, 2, 3])
def test_shared_prefix_features_equal_full_length(tiny: FrozenCLIP, count: int) -> None:
    bank = PromptBank(tiny, NAMES, N_CTX)
    ctx = contexts(count, tiny.text_width)
    shared = bank.encode(ctx)
    reference = full_length(tiny, NAMES, ctx)
    assert shared.shape == (count, len(NAMES), tiny.embed_dim)
    assert torch.allclose(shared, reference, atol=1e-4, rtol=0)
    # Different contexts and different classes give different features: nothing is mixed up.
    assert (reference[:, :-1] - reference[:, 1:]).abs().max() > 1e-2


def test_shared_prefix_gradients_equal_full_length(tiny: FrozenCLIP) -> None:
    bank = PromptBank(tiny, NAMES, N_CTX)
    ctx = contexts(2, tiny.text_width, seed=1)
    weights = torch.randn(2, len(NAMES), tiny.embed_dim, generator=torch.Generator().manual_seed(2))
    (grad_shared,) = torch.autograd.grad((bank.encode(ctx) * weights).sum(), ctx)
    (grad_full,) = torch.autograd.grad((full_length(tiny, NAMES, ctx) * weights).sum(), ctx)
    assert grad_full.norm() > 0
    assert (grad_shared - grad_full).norm() / grad_full.norm() < 1e-4


def test_single_context_and_class_order(tiny: FrozenCLIP) -> None:
    """A (M, D) context gives (C, E); reversing the class list reverses the features."""
    ctx = contexts(1, tiny.text_width, seed=3)[0].detach()
    forward = PromptBank(tiny, NAMES, N_CTX).encode(ctx)
    backward = PromptBank(tiny, NAMES[::-1], N_CTX).encode(ctx)
    assert forward.shape == (len(NAMES), tiny.embed_dim)
    assert torch.allclose(forward, backward.flip(0), atol=1e-5)


def test_a_tower_without_causal_mask_falls_back_to_full_prompts(tiny: FrozenCLIP) -> None:
    backbone = FrozenCLIP.load(BackboneSpec("fedpgp-tiny", None))
    backbone.text.attn_mask = None
    bank = PromptBank(backbone, NAMES, N_CTX)
    assert bank._shared is None
    ctx = contexts(2, backbone.text_width).detach()
    assert bank.encode(ctx).shape == (2, len(NAMES), backbone.embed_dim)
