"""FedCoCoOp against a reference written from its specification (loss, gradients and
prediction, one image at a time), its cost (one encoder call per batch), what leaves a client,
and the Flower apps giving the in-process numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from flowerkit import LoopbackGrid, flower_config, task_identity  # noqa: F401
from runkit import clients_of, start_global
from tiny import tiny_overrides

from fedpgp.backbone import BackboneSpec, FrozenCLIP
from fedpgp.config import load_config
from fedpgp.errors import ConfigError
from fedpgp.experiment import build_experiment
from fedpgp.federation.flower.client_app import make_client_app
from fedpgp.federation.flower.server_app import run_server
from fedpgp.federation.flower.settings import ServerSettings
from fedpgp.federation.inprocess import run_inprocess
from fedpgp.methods.base import create_method
from fedpgp.prompts import PromptBank
from fedpgp.report import build_results

NAMES = ["dog", "red striped triangle", "cat", "wine glass"]


@pytest.fixture(scope="module")
def tiny() -> FrozenCLIP:
    return FrozenCLIP.load(BackboneSpec("fedpgp-tiny", None))


def reference_logits(tiny: FrozenCLIP, bank: PromptBank, params: dict, x: torch.Tensor):
    """s f . Enc(ctx + meta_net(f), c) for one image, the meta-net written as two layers and the
    prompts run through the plain text tower (no shared prefix)."""
    hidden = torch.relu(params["meta_w1"] @ x + params["meta_b1"])
    shift = params["meta_w2"] @ hidden + params["meta_b2"]
    context = params["ctx"] + shift  # the same shift for every context token
    text = tiny.encode_prompts(bank.assemble(context[None]), bank.eot)
    return tiny.logit_scale * (text @ x)


def setup(tiny: FrozenCLIP, overrides: tuple[str, ...] = ()):
    cfg = load_config(None, ["method=fedcocoop", "n_ctx=3", *overrides])
    method = create_method(cfg, tiny.logit_scale, embed_dim=tiny.embed_dim)
    generator = torch.Generator().manual_seed(1)
    features = F.normalize(torch.randn(5, tiny.embed_dim, generator=generator), dim=-1)
    return method, method.initial_global(tiny.text_width), features


def test_loss_and_gradients_equal_the_reference(tiny: FrozenCLIP) -> None:
    method, start, features = setup(tiny, ("fedcocoop.reduction=4",))
    bank = PromptBank(tiny, NAMES, n_ctx=3)
    labels = torch.tensor([0, 3, 1, 2, 2])
    # E / reduction hidden units, D outputs.
    assert start["meta_w1"].shape == (tiny.embed_dim // 4, tiny.embed_dim)
    assert start["meta_w2"].shape == (tiny.text_width, tiny.embed_dim // 4)

    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    loss = method.loss(params, features, labels, bank, {})
    loss.backward()

    reference = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    expected = sum(
        F.cross_entropy(reference_logits(tiny, bank, reference, x)[None], y[None])
        for x, y in zip(features, labels, strict=True)
    ) / len(labels)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=0)
    for key, value in params.items():
        mine, theirs = value.grad, reference[key].grad
        assert float(theirs.norm()) > 0, key
        assert float((mine - theirs).norm()) <= 1e-4 * float(theirs.norm()), key


def test_prediction_uses_each_images_own_context(tiny: FrozenCLIP) -> None:
    method, start, features = setup(tiny)
    # A meta-net strong enough that contexts differ visibly between images.
    start = {**start, "meta_w2": start["meta_w2"] * 50}
    bank = PromptBank(tiny, NAMES, n_ctx=3)
    with torch.no_grad():
        expected = torch.stack([reference_logits(tiny, bank, start, x).argmax() for x in features])
        predicted = method.predict(start, bank, features)
        views = method.predict(start, bank, torch.stack([features, features.flip(0)]))
    assert torch.equal(predicted, expected)
    assert torch.equal(views, torch.stack([expected, expected.flip(0)]))


def test_a_batch_is_one_encoder_call(tiny: FrozenCLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    method, start, features = setup(tiny)
    bank = PromptBank(tiny, NAMES, n_ctx=3)
    calls: list[tuple[int, ...]] = []
    encode = PromptBank.encode

    def counted(self: PromptBank, contexts: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(contexts.shape))
        return encode(self, contexts)

    monkeypatch.setattr(PromptBank, "encode", counted)
    method.loss(start, features, torch.zeros(5, dtype=torch.long), bank, {})
    assert calls == [(5, 3, tiny.text_width)]


def test_both_tensors_leave_the_client_and_nothing_else(tiny_data: Path) -> None:
    cfg = load_config(None, tiny_overrides(tiny_data, method="fedcocoop", lr=0.05))
    experiment = build_experiment(cfg)
    client = clients_of(experiment)[0]
    start = start_global(experiment)
    update = client.train(start, 0)
    assert set(update.tensors) == {"ctx", "meta_w1", "meta_b1", "meta_w2", "meta_b2"}
    assert client.personal == {}
    for key, value in update.tensors.items():
        assert not torch.equal(value, start[key]), key


def test_reduction_below_one_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"fedcocoop\.reduction: expected a value >= 1"):
        load_config(None, ["method=fedcocoop", "fedcocoop.reduction=0"])


def test_the_flower_apps_give_the_inprocess_numbers(tiny_data: Path, tmp_path: Path) -> None:
    cfg = flower_config(tiny_data, method="fedcocoop", lr=0.05)
    rows, zeroshot, _ = run_inprocess(build_experiment(cfg))
    app = make_client_app(cfg, all_clients=True, state_dir=tmp_path / "nodes")
    results = run_server(LoopbackGrid(app, {101: 0, 202: 1}), cfg, ServerSettings(tmp_path / "run"))
    assert results == build_results(cfg.to_dict(), rows, zeroshot)
