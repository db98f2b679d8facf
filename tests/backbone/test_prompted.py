"""The prompted image tower: no prompt is open_clip's encode_image; layer-0 and deep prompts and
adapters equal the loop over the blocks of tests/towers.py (prompts appended before
``ln_pre``, deep prompts replacing the last tokens); a tower it cannot replay is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from towers import image_features

from fedpgp.backbone import BackboneSpec, FrozenCLIP
from fedpgp.backbone.prompted import PromptedImageTower
from fedpgp.errors import BackboneError

TINY = BackboneSpec(name="fedpgp-tiny", pretrained=None)
WORLD = BackboneSpec()


@pytest.fixture(scope="module", params=[TINY, WORLD], ids=["tiny", "world"])
def backbone(request: pytest.FixtureRequest) -> FrozenCLIP:
    return FrozenCLIP.load(request.param)


def _images(backbone: FrozenCLIP, count: int, seed: int = 0) -> Tensor:
    size = backbone.image_size
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _prompts(tower: PromptedImageTower, length: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(length, tower.width, generator=generator)


def test_no_prompt_is_open_clips_encode_image(backbone: FrozenCLIP) -> None:
    tower = PromptedImageTower(backbone)
    images = _images(backbone, 5)
    ours = tower.encode(tower.stem(images))
    assert torch.allclose(ours, backbone.encode_images(images), atol=1e-5)


@pytest.mark.parametrize("deep_count", [0, 1, "all"])
def test_prompts_equal_the_loop_over_the_blocks(backbone: FrozenCLIP, deep_count) -> None:
    tower = PromptedImageTower(backbone)
    deep_count = tower.depth - 1 if deep_count == "all" else deep_count
    images = _images(backbone, 4, seed=1)
    prompts = _prompts(tower, 3, seed=2)
    deep = [_prompts(tower, 3, seed=10 + i) for i in range(deep_count)]
    ours = tower.encode(tower.stem(images), prompts, deep)
    reference = image_features(backbone, images, prompts, deep)
    assert torch.allclose(ours, reference, atol=1e-5)
    # The prompts change the features (so the check above is not of the plain tower).
    assert (ours - backbone.encode_images(images)).abs().max() > 1e-3
    # A stem stored in float16 (as the feature cache keeps it) runs in float32 all the same.
    stored = tower.encode(tower.stem(images).half(), prompts, deep)
    assert stored.dtype == torch.float32 and torch.allclose(stored, ours, atol=1e-2)


def test_a_prompt_per_image_equals_each_image_alone(backbone: FrozenCLIP) -> None:
    tower = PromptedImageTower(backbone)
    images = _images(backbone, 3, seed=3)
    per_image = torch.stack([_prompts(tower, 2, seed=20 + i) for i in range(3)])
    deep = [torch.stack([_prompts(tower, 2, seed=30 + i) for i in range(3)])]
    together = tower.encode(tower.stem(images), per_image, deep)
    for i in range(3):
        alone = tower.encode(tower.stem(images[i : i + 1]), per_image[i], [deep[0][i]])
        assert torch.allclose(together[i], alone[0], atol=1e-5)


def test_gradients_reach_every_prompt_and_not_the_tower() -> None:
    backbone = FrozenCLIP.load(TINY)
    tower = PromptedImageTower(backbone)
    prompts = _prompts(tower, 2, seed=4).requires_grad_()
    deep = [_prompts(tower, 2, seed=5 + i).requires_grad_() for i in range(tower.depth - 1)]
    tower.encode(tower.stem(_images(backbone, 3)), prompts, deep).sum().backward()
    for tensor in [prompts, *deep]:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
        assert tensor.grad.abs().max() > 0
    assert all(p.grad is None for p in backbone.parameters())


def _adapter(width: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        0.3 * torch.randn(4, width, generator=generator),
        0.3 * torch.randn(width, 4, generator=generator),
    )


def _adapters(weights: dict[int, tuple[Tensor, Tensor]]) -> dict:
    """Adapters relu(ln_1(x) A^T) B^T per block, in the towers' protocol."""
    return {
        index: (lambda x, block, a=a, b=b: F.relu(block.ln_1(x) @ a.t()) @ b.t())
        for index, (a, b) in weights.items()
    }


def test_adapters_and_later_stems_equal_the_loop_over_the_blocks(backbone: FrozenCLIP) -> None:
    tower = PromptedImageTower(backbone)
    images = _images(backbone, 3, seed=8)
    first = tower.depth // 2
    weights = {i: _adapter(tower.width, 40 + i) for i in range(first, tower.depth)}
    reference = image_features(backbone, images, adapters=_adapters(weights))
    from_zero = tower.encode(tower.stem(images), adapters=_adapters(weights))
    later = tower.stem(images, block=first)
    from_first = tower.encode(later, adapters=_adapters(weights), start=first)
    assert torch.allclose(from_zero, reference, atol=1e-5)
    assert torch.allclose(from_first, reference, atol=1e-5)
    assert (reference - backbone.encode_images(images)).abs().max() > 1e-3
    # A later stem with no adapter is still the plain tower.
    assert torch.allclose(
        tower.encode(later, start=first), backbone.encode_images(images), atol=1e-5
    )


def test_bad_prompt_shapes_and_depths_are_refused() -> None:
    tower = PromptedImageTower(FrozenCLIP.load(TINY))
    stem = tower.stem(_images(tower.backbone, 1))
    prompts = _prompts(tower, 2, seed=6)
    with pytest.raises(ValueError, match="pass prompts too"):
        tower.encode(stem, None, [prompts])
    with pytest.raises(ValueError, match=f"has {tower.depth}"):
        tower.encode(stem, prompts, [prompts] * tower.depth)
    with pytest.raises(ValueError, match="the 2 tokens it replaces"):
        tower.encode(stem, prompts, [_prompts(tower, 3, seed=7)])
    adapter = _adapters({tower.depth: _adapter(tower.width, 1)})
    with pytest.raises(ValueError, match=rf"adapters in blocks \[{tower.depth}\], the image"):
        tower.encode(stem, adapters=adapter)
    with pytest.raises(ValueError, match="the stem enters block 1"):
        tower.encode(tower.stem(_images(tower.backbone, 1), block=1), prompts, start=1)
    with pytest.raises(ValueError, match=f"has blocks 0 .. {tower.depth - 1}"):
        tower.stem(_images(tower.backbone, 1), block=tower.depth)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda visual: setattr(visual, "attn_pool", torch.nn.Identity()), "pools images by"),
        (lambda visual: setattr(visual, "final_ln_after_pool", True), "after pooling"),
        (lambda visual: setattr(visual, "pool_type", "avg"), "not the class token"),
    ],
)
def test_a_tower_it_cannot_replay_is_refused_by_name(change, reason: str) -> None:
    backbone = FrozenCLIP.load(TINY)
    change(backbone.model.visual)
    with pytest.raises(BackboneError, match=f"model 'fedpgp-tiny' cannot take prompts.*{reason}"):
        PromptedImageTower(backbone)
