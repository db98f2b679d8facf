"""PromptFolio against a reference written from its specification (loss and gradients), what
leaves a client, its config section, and the Flower apps giving the in-process numbers."""

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


def reference_loss(
    tiny: FrozenCLIP,
    bank: PromptBank,
    ctx_global: torch.Tensor,
    ctx_local: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    theta: float,
) -> torch.Tensor:
    """Cross-entropy of s f . ((1 - theta) z_G,c + theta z_L,c), each z from the plain text
    tower (no shared prefix), one image and one class at a time."""

    def encode(ctx: torch.Tensor) -> torch.Tensor:
        return tiny.encode_prompts(bank.assemble(ctx[None]), bank.eot)

    z_global, z_local = encode(ctx_global), encode(ctx_local)
    total = torch.zeros(())
    for x, y in zip(features, labels, strict=True):
        logits = torch.stack(
            [
                tiny.logit_scale * (x @ ((1 - theta) * z_global[c] + theta * z_local[c]))
                for c in range(len(NAMES))
            ]
        )
        total = total + torch.logsumexp(logits, dim=0) - logits[int(y)]
    return total / len(labels)


@pytest.mark.parametrize("theta", [0.4, 0.0, 1.0])
def test_loss_and_gradients_equal_the_reference(theta: float) -> None:
    tiny = FrozenCLIP.load(BackboneSpec("fedpgp-tiny", None))
    cfg = load_config(None, ["method=promptfolio", "n_ctx=3", f"promptfolio.theta={theta}"])
    method = create_method(cfg, tiny.logit_scale)
    width = tiny.text_width
    start = {**method.initial_global(width), **method.initial_personal(width, 0)}
    bank = PromptBank(tiny, NAMES, n_ctx=3)
    generator = torch.Generator().manual_seed(1)
    features = F.normalize(torch.randn(6, tiny.embed_dim, generator=generator), dim=-1)
    labels = torch.tensor([0, 3, 1, 2, 2, 0])

    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    loss = method.loss(params, features, labels, bank, {})
    loss.backward()
    ours = {k: v.grad for k, v in params.items()}

    g = start["ctx_global"].clone().requires_grad_(True)
    local = start["ctx_local"].clone().requires_grad_(True)
    expected = reference_loss(tiny, bank, g, local, features, labels, theta)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=0)
    # Relative to the gradient's norm: float32 noise of two encoder paths on near-zero entries.
    for mine, reference in ((ours["ctx_global"], g.grad), (ours["ctx_local"], local.grad)):
        assert float((mine - reference).norm()) <= 1e-4 * float(reference.norm()) + 1e-12
    # theta 0 is PromptFL's prediction, theta 1 a local CoOp's: the other prompt gets nothing.
    if theta == 0.0:
        assert not ours["ctx_local"].abs().sum()
    if theta == 1.0:
        assert not ours["ctx_global"].abs().sum()


def test_only_the_global_prompt_leaves_a_client(tiny_data: Path) -> None:
    cfg = load_config(None, tiny_overrides(tiny_data, method="promptfolio", lr=0.05))
    experiment = build_experiment(cfg)
    clients = clients_of(experiment)
    # Every client starts from the same local prompt, as the authors' do.
    assert torch.equal(clients[0].personal["ctx_local"], clients[1].personal["ctx_local"])
    before = clients[0].personal["ctx_local"].clone()
    update = clients[0].train(start_global(experiment), 0)
    assert set(update.tensors) == {"ctx_global"}
    assert set(clients[0].personal) == {"ctx_local"}
    assert not torch.equal(clients[0].personal["ctx_local"], before)
    for tensor in update.tensors.values():
        assert not torch.equal(tensor, clients[0].personal["ctx_local"])


@pytest.mark.parametrize("theta", ["-0.1", "1.5"])
def test_theta_outside_0_1_is_refused(theta: str) -> None:
    with pytest.raises(ConfigError, match=r"promptfolio\.theta: expected a value >= 0 and <= 1"):
        load_config(None, ["method=promptfolio", f"promptfolio.theta={theta}"])


def test_the_flower_apps_give_the_inprocess_numbers(tiny_data: Path, tmp_path: Path) -> None:
    cfg = flower_config(tiny_data, method="promptfolio", lr=0.05)
    rows, zeroshot, _ = run_inprocess(build_experiment(cfg))
    app = make_client_app(cfg, all_clients=True, state_dir=tmp_path / "nodes")
    results = run_server(LoopbackGrid(app, {101: 0, 202: 1}), cfg, ServerSettings(tmp_path / "run"))
    assert results == build_results(cfg.to_dict(), rows, zeroshot)
