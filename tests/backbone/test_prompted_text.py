"""The text tower's prompts for the methods that prompt inside the encoders: a suffix template
(a context of "a photo" before "of a {}." is the hand-crafted prompt), and deep prompts, which
replace the context positions before later blocks, equal to a loop over the blocks written here
on both encoding paths (prefix-shared and full-length), gradients included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fedpgp.backbone import BackboneSpec, FrozenCLIP
from fedpgp.errors import ConfigError
from fedpgp.prompts import PromptBank

TINY = BackboneSpec(name="fedpgp-tiny", pretrained=None)
NAMES = ["red star", "blue circle", "striped green triangle"]


@pytest.fixture(scope="module", params=[TINY, BackboneSpec()], ids=["tiny", "world"])
def backbone(request: pytest.FixtureRequest) -> FrozenCLIP:
    return FrozenCLIP.load(request.param)


def _full_length(bank: PromptBank) -> PromptBank:
    """The same bank forced onto the full-length path."""
    bank._shared = None
    return bank


def _by_hand(
    bank: PromptBank, contexts: Tensor, deep: list[Tensor], adapters: dict | None = None
) -> Tensor:
    """Features (P, C, E): every (context, class) prompt through the text blocks one by one,
    positions 1 .. M of deep[i - 1] (one per context, (P, M, D)) written over before block i,
    and adapter i's term added to block i's output."""
    adapters = adapters or {}
    text = bank.backbone.text
    count, classes = contexts.shape[0], len(bank)
    x = bank.assemble(contexts)
    length = x.shape[1]
    x = x + text.positional_embedding[:length]
    mask = text.attn_mask[:length, :length]
    for index, block in enumerate(text.transformer.resblocks):
        if 1 <= index <= len(deep):
            tokens = deep[index - 1].repeat_interleave(classes, dim=0)
            x = torch.cat([x[:, :1], tokens, x[:, 1 + tokens.shape[1] :]], dim=1)
        out = block(x, attn_mask=mask)
        x = out + adapters[index](x, block) if index in adapters else out
    x = text.ln_final(x)[torch.arange(x.shape[0]), bank.eot.repeat(count)]
    return F.normalize(x @ text.text_projection, dim=-1).view(count, classes, -1)


@pytest.mark.parametrize("path", ["shared", "full"])
def test_a_photo_before_of_a_name_is_the_hand_crafted_prompt(backbone: FrozenCLIP, path) -> None:
    bank = PromptBank(backbone, NAMES, 2, suffix="of a {}.")
    bank = _full_length(bank) if path == "full" else bank
    ids, _ = backbone.tokenize(["a photo"])
    context = backbone.embed_tokens(ids)[0, 1:3]
    assert torch.allclose(bank.encode(context), bank.anchor("paper"), atol=1e-5)


def _deep(backbone: FrozenCLIP, count: int, depth: int, length: int, seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = backbone.text_width
    return [0.5 * torch.randn(count, length, width, generator=generator) for _ in range(depth)]


@pytest.mark.parametrize("path", ["shared", "full"])
@pytest.mark.parametrize("length", [2, 4])
def test_deep_prompts_equal_the_loop_over_the_blocks(
    backbone: FrozenCLIP, path: str, length: int
) -> None:
    bank = PromptBank(backbone, NAMES, 4)
    bank = _full_length(bank) if path == "full" else bank
    blocks = len(backbone.text.transformer.resblocks)
    contexts = _deep(backbone, 2, 1, 4, seed=1)[0]
    deep = _deep(backbone, 2, blocks - 1, length, seed=2)
    ours = bank.encode(contexts, deep)
    assert torch.allclose(ours, _by_hand(bank, contexts, deep), atol=1e-4)
    assert (ours - bank.encode(contexts)).abs().max() > 1e-3
    # A deep prompt shared by the contexts is the same prompt given to each.
    shared = [tokens[0] for tokens in deep]
    each = [tokens[:1].expand(2, -1, -1) for tokens in deep]
    assert torch.allclose(bank.encode(contexts, shared), bank.encode(contexts, each), atol=1e-5)


def _adapters(backbone: FrozenCLIP, blocks: list[int], seed: int) -> dict:
    """Adapters relu(ln_1(x) A^T) B^T, with trainable A and B."""
    generator = torch.Generator().manual_seed(seed)
    width, adapters = backbone.text_width, {}
    for index in blocks:
        a = (0.3 * torch.randn(4, width, generator=generator)).requires_grad_()
        b = (0.3 * torch.randn(width, 4, generator=generator)).requires_grad_()
        adapters[index] = lambda x, block, a=a, b=b: F.relu(block.ln_1(x) @ a.t()) @ b.t()
        adapters[index].weights = (a, b)
    return adapters


@pytest.mark.parametrize("path", ["shared", "full"])
def test_adapters_equal_the_loop_over_the_blocks(backbone: FrozenCLIP, path: str) -> None:
    bank = PromptBank(backbone, NAMES, 4)
    bank = _full_length(bank) if path == "full" else bank
    blocks = len(backbone.text.transformer.resblocks)
    adapters = _adapters(backbone, list(range(1, blocks)), seed=5)
    contexts = _deep(backbone, 2, 1, 4, seed=6)[0]
    ours = bank.encode(contexts, adapters=adapters)
    assert torch.allclose(ours, _by_hand(bank, contexts, [], adapters), atol=1e-4)
    assert (ours - bank.encode(contexts)).abs().max() > 1e-3


def test_both_paths_give_the_same_adapter_gradients() -> None:
    backbone = FrozenCLIP.load(TINY)
    grads = []
    for bank in (PromptBank(backbone, NAMES, 3), _full_length(PromptBank(backbone, NAMES, 3))):
        adapters = _adapters(backbone, [1], seed=7)
        contexts = _deep(backbone, 2, 1, 3, seed=8)[0]
        weight = torch.linspace(-1, 1, backbone.embed_dim)
        (bank.encode(contexts, adapters=adapters) * weight).sum().backward()
        grads.append([w.grad for w in adapters[1].weights])
    for shared, full in zip(*grads, strict=True):
        assert shared.abs().max() > 0
        assert float((shared - full).norm() / full.norm()) < 1e-4


def test_both_paths_give_the_same_gradients() -> None:
    backbone = FrozenCLIP.load(TINY)
    grads = []
    for bank in (PromptBank(backbone, NAMES, 3), _full_length(PromptBank(backbone, NAMES, 3))):
        contexts = _deep(backbone, 2, 1, 3, seed=3)[0].requires_grad_()
        deep = [t.requires_grad_() for t in _deep(backbone, 2, 1, 2, seed=4)]
        (bank.encode(contexts, deep) * torch.linspace(-1, 1, backbone.embed_dim)).sum().backward()
        grads.append([contexts.grad, deep[0].grad])
    for shared, full in zip(*grads, strict=True):
        assert shared.abs().max() > 0
        assert float((shared - full).norm() / full.norm()) < 1e-4


def test_bad_deep_prompts_and_suffixes_are_refused() -> None:
    backbone = FrozenCLIP.load(TINY)
    bank = PromptBank(backbone, NAMES, 2)
    context = torch.zeros(2, backbone.text_width)
    blocks = len(backbone.text.transformer.resblocks)
    with pytest.raises(ValueError, match="cannot replace more than the 2 context positions"):
        bank.encode(context, [torch.zeros(3, backbone.text_width)])
    with pytest.raises(ValueError, match=f"the text tower has {blocks}"):
        bank.encode(context, [torch.zeros(2, backbone.text_width)] * blocks)
    with pytest.raises(ValueError, match=rf"adapters in blocks \[{blocks}\], the text tower"):
        bank.encode(context, adapters=_adapters(backbone, [blocks], seed=0))
    with pytest.raises(ConfigError, match="expected one"):
        PromptBank(backbone, NAMES, 2, suffix="of a thing.")
    long = " ".join(["word"] * 72)
    with pytest.raises(ConfigError, match="need .* positions, the model 'fedpgp-tiny' has"):
        PromptBank(backbone, [long], 2, suffix="of a {}.")
