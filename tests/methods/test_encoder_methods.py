"""VPT, IVLP, MaPLe and pFedMMA against references written in this file from
../shared/BASELINES.md Part B (loss and gradients, relative 1e-4, on the tiny CLIP), and their
settings checked against the towers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from flowerkit import LoopbackGrid, array_names, flower_config, task_identity  # noqa: F401
from torch import Tensor, nn
from towers import assert_gradients_match, cross_entropy, image_features, text_features

from fedpgp.backbone import BackboneSpec, FrozenCLIP
from fedpgp.backbone.prompted import PromptedImageTower
from fedpgp.config import load_config
from fedpgp.errors import BackboneError, ConfigError
from fedpgp.experiment import build_experiment, stem_block
from fedpgp.federation.flower.client_app import make_client_app
from fedpgp.federation.flower.server_app import run_server
from fedpgp.federation.flower.settings import ServerSettings
from fedpgp.federation.inprocess import run_inprocess
from fedpgp.methods.base import Method, method_for
from fedpgp.methods.registry import method_class
from fedpgp.prompts import PromptBank
from fedpgp.report import build_results

NAMES = ["dog", "red striped triangle", "cat", "wine glass"]
LABELS = torch.tensor([0, 3, 1, 2, 2])


@pytest.fixture(scope="module")
def tiny() -> FrozenCLIP:
    return FrozenCLIP.load(BackboneSpec("fedpgp-tiny", None))


def _images(backbone: FrozenCLIP, seed: int = 0) -> Tensor:
    size = backbone.image_size
    return torch.randn(len(LABELS), 3, size, size, generator=torch.Generator().manual_seed(seed))


def _start(method: Method, backbone: FrozenCLIP, seed: int) -> dict[str, Tensor]:
    """The method's starting tensors moved off their start by N(0, 0.05^2) noise, so that no
    term is at a special case of its initialisation (zero biases, identical projections)."""
    width = backbone.text_width
    start = {**method.initial_global(width), **method.initial_personal(width, 0)}
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in start.items()}


def _library(
    method: Method, backbone: FrozenCLIP, start: dict[str, Tensor], images: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """The method's loss on the images' stems and its gradients."""
    bank = PromptBank(backbone, NAMES, *method.template)
    stems = PromptedImageTower(backbone).stem(images, stem_block(method.image_kind))
    params = {k: v.clone().requires_grad_() for k, v in start.items()}
    loss = method.loss(params, stems, LABELS, bank, {})
    loss.backward()
    return loss, {k: v.grad for k, v in params.items()}


def _reference(
    start: dict[str, Tensor], images: Tensor, logits: Callable[..., Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """CE of ``logits(tensors, images)`` image by image, and its gradients."""
    tensors = {k: v.clone().requires_grad_() for k, v in start.items()}
    loss = cross_entropy(logits(tensors, images), LABELS)
    loss.backward()
    return loss, {k: v.grad for k, v in tensors.items()}


def _check(ours: tuple[Tensor, dict], reference: tuple[Tensor, dict]) -> None:
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-4, atol=0)
    assert_gradients_match(ours[1], reference[1])


def _method(backbone: FrozenCLIP, *overrides: str) -> Method:
    return method_for(load_config(None, list(overrides)), backbone)


def test_vpt_equals_the_reference(tiny: FrozenCLIP) -> None:
    method = _method(tiny, "method=vpt", "vpt.depth=2", "vpt.length=3")
    start = _start(method, tiny, seed=1)
    images = _images(tiny)
    # The frozen hand-crafted text: no context, the whole phrase in the suffix.
    hand_crafted = text_features(tiny, NAMES, torch.zeros(0, tiny.text_width), "a photo of a {}.")

    def logits(t: dict[str, Tensor], x: Tensor) -> Tensor:
        vision = t["vision"]
        features = image_features(tiny, x, vision[0], [vision[1]])
        return tiny.logit_scale * features @ hand_crafted.t()

    _check(_library(method, tiny, start, images), _reference(start, images, logits))


@pytest.mark.parametrize("depths", [(1, 1), (2, 2), (1, 2)])
def test_ivlp_equals_the_reference(tiny: FrozenCLIP, depths: tuple[int, int]) -> None:
    text_depth, vision_depth = depths
    method = _method(
        tiny, "method=ivlp", f"ivlp.text_depth={text_depth}", f"ivlp.vision_depth={vision_depth}"
    )
    start = _start(method, tiny, seed=2)
    images = _images(tiny, seed=1)
    assert start["text"].shape == (text_depth, 2, tiny.text_width)

    def logits(t: dict[str, Tensor], x: Tensor) -> Tensor:
        text, vision = t["text"], t["vision"]
        z = text_features(tiny, NAMES, text[0], "of a {}.", list(text[1:]))
        features = image_features(tiny, x, vision[0], list(vision[1:]))
        return tiny.logit_scale * features @ z.t()

    _check(_library(method, tiny, start, images), _reference(start, images, logits))


def test_maple_equals_the_reference(tiny: FrozenCLIP) -> None:
    method = _method(tiny, "method=maple")
    # Three quarters of the tiny CLIP's 2 blocks, rounded: prompts in both blocks.
    assert method.depth == 2
    start = _start(method, tiny, seed=3)
    images = _images(tiny, seed=2)

    def logits(t: dict[str, Tensor], x: Tensor) -> Tensor:
        text = t["text"]
        z = text_features(tiny, NAMES, text[0], "of a {}.", [text[1]])
        vision = [F.linear(text[i], t["proj_w"][i], t["proj_b"][i]) for i in range(2)]
        features = image_features(tiny, x, vision[0], [vision[1]])
        return tiny.logit_scale * features @ z.t()

    _check(_library(method, tiny, start, images), _reference(start, images, logits))


def test_maple_deep_projections_start_as_copies_of_one(tiny: FrozenCLIP) -> None:
    method = _method(tiny, "method=maple")
    start = method.initial_global(tiny.text_width)
    assert start["proj_w"].shape == (2, PromptedImageTower(tiny).width, tiny.text_width)
    assert not torch.equal(start["proj_w"][0], start["proj_w"][1])
    # The text context starts as the embeddings of "a photo".
    ids, _ = tiny.tokenize(["a photo"])
    torch.testing.assert_close(start["text"][0], tiny.embed_tokens(ids)[0, 1:3])


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class _ScaleValue(torch.autograd.Function):
    """``scale`` times the input forward; the gradient passed through unscaled."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        return x * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _mma_adapters(t: dict[str, Tensor], tower: str, first: int, scale: float) -> dict:
    """pFedMMA's adapters by hand: s Up(relu(S(relu(Down(ln_1(x)))))), the gradient into x
    scaled by s and the adapter's own taken as if s were 1 (BASELINES.md Part B, section 3)."""

    def adapter(k: int) -> Callable[[Tensor, nn.Module], Tensor]:
        def apply(x: Tensor, block: nn.Module) -> Tensor:
            h = block.ln_1(_ScaleGradient.apply(x, scale))
            h = F.relu(h @ t[f"{tower}_down_w"][k].t() + t[f"{tower}_down_b"][k])
            h = F.relu(h @ t["shared_w"][k].t() + t["shared_b"][k])
            return _ScaleValue.apply(h @ t[f"{tower}_up_w"][k].t() + t[f"{tower}_up_b"][k], scale)

        return apply

    count = t["shared_w"].shape[0]
    return {first + k: adapter(k) for k in range(count)}


@pytest.mark.parametrize(("blocks", "scale"), [(None, 0.001), (None, 0.5), (2, 0.5)])
def test_pfedmma_equals_the_reference(tiny: FrozenCLIP, blocks: int | None, scale: float) -> None:
    overrides = ["method=pfedmma", f"pfedmma.scale={scale}"]
    if blocks is not None:
        overrides.append(f"pfedmma.blocks={blocks}")
    method = _method(tiny, *overrides)
    count = 1 if blocks is None else blocks
    # Two thirds of 2 blocks, rounded, is 1: the top block of each tower, whose input is the
    # cached image feature.
    assert method.blocks == count
    assert method.image_kind == ("stem@1" if count == 1 else "stem")
    start = _start(method, tiny, seed=4)
    images = _images(tiny, seed=3)
    # The fixed prompt "a photo of a {class}.": its four words are the context.
    ids, eot = tiny.tokenize(["a photo of a"])
    context = tiny.embed_tokens(ids)[0, 1 : int(eot[0])]

    def logits(t: dict[str, Tensor], x: Tensor) -> Tensor:
        first = 2 - count
        z = text_features(
            tiny, NAMES, context, "{}.", adapters=_mma_adapters(t, "text", first, scale)
        )
        vision = _mma_adapters(t, "vision", first, scale)
        return tiny.logit_scale * image_features(tiny, x, adapters=vision) @ z.t()

    _check(_library(method, tiny, start, images), _reference(start, images, logits))


def test_pfedmma_shares_only_the_projection_and_starts_every_client_alike(tiny: FrozenCLIP) -> None:
    method = _method(tiny, "method=pfedmma")
    assert method.global_keys == ("shared_w", "shared_b")
    width = tiny.text_width
    one, other = method.initial_personal(width, 0), method.initial_personal(width, 1)
    assert all(torch.equal(one[k], other[k]) for k in one)
    dim = method.cfg.pfedmma.dim
    # Kaiming (fan out, relu): std sqrt(2 / 32) = 0.25 for the down projections.
    assert abs(float(one["text_down_w"].std()) - (2 / dim) ** 0.5) < 0.02
    assert one["vision_up_w"].shape == (1, PromptedImageTower(tiny).width, dim)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["method=ivlp", "ivlp.vision_depth=3"],
            r"ivlp\.vision_depth: 3 blocks, but the image tower of 'fedpgp-tiny' has 2",
        ),
        (["method=ivlp", "ivlp.text_depth=5"], r"ivlp\.text_depth: 5 blocks, but the text tower"),
        (["method=maple", "maple.depth=3"], r"maple\.depth: 3 blocks, but the text tower"),
        (["method=vpt", "vpt.depth=4"], r"vpt\.depth: 4 blocks"),
        (["method=pfedmma", "pfedmma.blocks=3"], r"pfedmma\.blocks: 3 blocks"),
    ],
)
def test_depths_larger_than_the_tower_are_refused(
    tiny: FrozenCLIP, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _method(tiny, *overrides)


def test_a_prompt_past_the_context_length_names_its_key(tiny: FrozenCLIP) -> None:
    method = _method(tiny, "method=ivlp", "ivlp.text_length=70")
    with pytest.raises(ConfigError, match=r"ivlp\.text_length: 70 context tokens plus the prompt"):
        PromptBank(tiny, ["a very long class name indeed"], *method.template)


def test_a_tower_that_is_not_a_standard_vit_is_refused_by_name() -> None:
    backbone = FrozenCLIP.load(BackboneSpec("fedpgp-tiny", None))
    backbone.model.visual.attn_pool = nn.Identity()
    for name in ("vpt", "ivlp", "maple", "fedmgp", "pfedmma"):
        with pytest.raises(BackboneError, match="model 'fedpgp-tiny' cannot take prompts"):
            _method(backbone, f"method={name}")


@pytest.mark.parametrize("name", ["vpt", "ivlp", "maple", "fedmgp", "pfedmma"])
def test_the_flower_apps_give_the_inprocess_numbers_and_only_uploads_leave(
    tiny_data: Path, tmp_path: Path, name: str
) -> None:
    cfg = flower_config(tiny_data, method=name, lr=0.05, eval_every=1)
    rows, zeroshot, _ = run_inprocess(build_experiment(cfg))
    app = make_client_app(cfg, all_clients=True, state_dir=tmp_path / "nodes")
    results = run_server(LoopbackGrid(app, {101: 0, 202: 1}), cfg, ServerSettings(tmp_path / "run"))
    assert results == build_results(cfg.to_dict(), rows, zeroshot)
    # What left the nodes is what the method uploads: its GLOBAL tensors' names (FedMGP: the
    # groups it drew, under the global groups' names), never a PERSONAL tensor.
    sent_by_nodes = set(array_names(tmp_path / "run" / "messages.jsonl", direction="received"))
    method = method_class(name)
    assert sent_by_nodes == set(method.global_keys)
    assert not sent_by_nodes & set(method.personal_keys)


def test_a_resnet_backbone_is_refused_by_name(tmp_path: Path) -> None:
    """A CLIP whose image tower is open_clip's ResNet loads (its image size is one int), and
    every method that prompts inside the image tower refuses it, naming it."""
    import json

    import open_clip

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    }
    (tmp_path / "fedpgp-test-rn.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "fedpgp-test-rn.json")
    backbone = FrozenCLIP.load(BackboneSpec("fedpgp-test-rn", None))
    assert backbone.image_size == 32
    for name in ("vpt", "ivlp", "maple", "fedmgp", "pfedmma"):
        with pytest.raises(
            BackboneError, match="'fedpgp-test-rn' cannot take prompts.*ModifiedResNet"
        ):
            _method(backbone, f"method={name}")
