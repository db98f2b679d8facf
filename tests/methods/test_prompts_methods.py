"""Prompt assembly and the methods' losses, checked against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedpgp.backbone import BackboneSpec, FrozenCLIP
from fedpgp.config import load_config
from fedpgp.methods.base import create_method
from fedpgp.methods.fedpgp import contrastive_loss
from fedpgp.methods.registry import METHOD_NAMES, method_class
from fedpgp.prompts import PromptBank

NAMES = ["dog", "red striped triangle", "cat"]


@pytest.fixture(scope="module")
def tiny() -> FrozenCLIP:
    return FrozenCLIP.load(BackboneSpec(name="fedpgp-tiny", pretrained=None))


def test_bank_with_placeholder_context_equals_plain_text(tiny: FrozenCLIP) -> None:
    """Inserting the embeddings of 'x x x x' as the context gives the text 'x x x x {name}.'."""
    bank = PromptBank(tiny, NAMES, n_ctx=4)
    ids, _ = tiny.tokenize(["x x x x"])
    context = tiny.embed_tokens(ids)[0, 1:5]
    expected = tiny.encode_texts([f"x x x x {name}." for name in NAMES])
    assert torch.allclose(bank.encode(context), expected, atol=1e-5)


def test_bank_rejects_prompts_longer_than_the_model(tiny: FrozenCLIP) -> None:
    from fedpgp.errors import ConfigError

    with pytest.raises(ConfigError, match="n_ctx"):
        PromptBank(tiny, ["a " * 40 + "dog"], n_ctx=40)


def test_contrastive_loss_by_hand() -> None:
    z_c = torch.tensor([[1.0, 0.0]])
    z_g = torch.tensor([[0.6, 0.8]])
    z_p = torch.tensor([[0.0, 1.0]])
    tau = 0.5
    positive, negative = 0.6 / tau, 0.8 / tau
    expected = -math.log(math.exp(positive) / (math.exp(positive) + math.exp(negative)))
    assert contrastive_loss(z_c, z_g, z_p, tau).item() == pytest.approx(expected, rel=1e-6)


def test_fedpgp_loss_equals_the_formula(tiny: FrozenCLIP) -> None:
    cfg = load_config(None, ["n_ctx=4", "fedpgp.rank=2", "fedpgp.mu=0.7", "fedpgp.tau=0.3"])
    method = create_method(cfg, tiny.logit_scale)
    generator = torch.Generator().manual_seed(3)
    params = {**method.init_global(64, generator), **method.init_personal(64, generator)}
    bank = PromptBank(tiny, NAMES, n_ctx=4)
    features = F.normalize(torch.randn(5, tiny.embed_dim, generator=generator), dim=-1)
    labels = torch.tensor([0, 2, 1, 1, 0])
    loss = method.loss(params, features, labels, bank, {"sigma": params["sigma"]})

    sigma, U, V = params["sigma"], params["U"], params["V"]
    z_g = bank.encode(sigma)
    z_p = bank.encode(sigma + U @ V)
    z_c = tiny.encode_texts([f"a photo of a {name}." for name in NAMES])
    scale = tiny.logit_scale
    ce = 0.0
    for x, y in zip(features, labels, strict=False):
        logits = [scale * float(x @ z_p[c]) for c in range(len(NAMES))]
        ce += -logits[int(y)] + math.log(sum(math.exp(v) for v in logits))
    ce /= len(labels)
    con = 0.0
    for c in range(len(NAMES)):
        pos = math.exp(float(z_c[c] @ z_g[c]) / 0.3)
        neg = math.exp(float(z_g[c] @ z_p[c]) / 0.3)
        con += -math.log(pos / (pos + neg))
    con /= len(NAMES)
    assert loss.item() == pytest.approx(ce + 0.7 * con, rel=1e-5)


def test_fedprox_adds_the_proximal_term(tiny: FrozenCLIP) -> None:
    cfg = load_config(None, ["n_ctx=4", "method=fedprox", "fedprox.mu=0.5"])
    fedprox = create_method(cfg, tiny.logit_scale)
    promptfl = create_method(cfg, tiny.logit_scale, name="promptfl")
    generator = torch.Generator().manual_seed(0)
    start = fedprox.init_global(64, generator)
    moved = {"ctx": start["ctx"] + 0.1}
    bank = PromptBank(tiny, NAMES, n_ctx=4)
    features = F.normalize(torch.randn(4, tiny.embed_dim, generator=generator), dim=-1)
    labels = torch.tensor([0, 1, 2, 0])
    difference = fedprox.loss(moved, features, labels, bank, start) - promptfl.loss(
        moved, features, labels, bank, start
    )
    expected = 0.5 * 0.5 * (0.1**2) * start["ctx"].numel()
    assert difference.item() == pytest.approx(expected, rel=1e-4)


def test_methods_declare_global_and_personal_tensors() -> None:
    declared = {
        name: (method_class(name).global_keys, method_class(name).personal_keys)
        for name in METHOD_NAMES
    }
    assert declared["fedpgp"] == (("sigma",), ("U", "V"))
    assert declared["promptfl"] == (("ctx",), ())
    assert declared["fedprox"] == (("ctx",), ())
    assert declared["local"] == ((), ("ctx",))
    assert declared["zeroshot"] == ((), ())


def test_fedpgp_initialisation_scale() -> None:
    cfg = load_config(None, ["n_ctx=16", "fedpgp.rank=8"])
    method = create_method(cfg, 100.0)
    generator = torch.Generator().manual_seed(0)
    tensors = {**method.init_global(512, generator), **method.init_personal(512, generator)}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "sigma": (16, 512),
        "U": (16, 8),
        "V": (8, 512),
    }
    assert tensors["sigma"].std().item() == pytest.approx(0.02, rel=0.05)
