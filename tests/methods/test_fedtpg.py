"""FedTPG against a reference written from its specification (PyTorch's own modules for the
attention and the layer norms, the plain text tower for the prompts), its protocol defaults
(each client over its own classes, the unweighted mean), prompts generated per class list, and
the Flower apps giving the in-process numbers."""

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
from fedpgp.federation.server import Server
from fedpgp.federation.update import Update
from fedpgp.methods.base import create_method
from fedpgp.prompts import PromptBank
from fedpgp.report import build_results

NAMES = ["dog", "red striped triangle", "cat", "wine glass"]


@pytest.fixture(scope="module")
def tiny() -> FrozenCLIP:
    return FrozenCLIP.load(BackboneSpec("fedpgp-tiny", None))


def reference_context(p: dict, names: torch.Tensor, heads: int) -> torch.Tensor:
    """The generator as the specification builds it: nn.MultiheadAttention (keys and values
    E wide) over layer-normed queries and names, no residual, then LN, Linear, GEGLU, Linear
    added to the attention's output."""
    width, embed = p["tpg_prompt"].shape[1], names.shape[1]
    attention = torch.nn.MultiheadAttention(width, heads, kdim=embed, vdim=embed)
    tensors = {
        "q_proj_weight": p["tpg_q_w"],
        "k_proj_weight": p["tpg_k_w"],
        "v_proj_weight": p["tpg_v_w"],
        "in_proj_bias": torch.cat([p["tpg_q_b"], p["tpg_k_b"], p["tpg_v_b"]]),
        "out_proj.weight": p["tpg_out_w"],
        "out_proj.bias": p["tpg_out_b"],
    }
    query = F.layer_norm(p["tpg_prompt"], (width,), p["tpg_ln_q_w"], p["tpg_ln_q_b"])
    kv = F.layer_norm(names, (embed,), p["tpg_ln_kv_w"], p["tpg_ln_kv_b"])
    attended, _ = torch.func.functional_call(attention, tensors, (query, kv, kv))
    normed = F.layer_norm(attended, (width,), p["tpg_ln_f_w"], p["tpg_ln_f_b"])
    projected = normed @ p["tpg_ff1_w"].t() + p["tpg_ff1_b"]
    inner = projected.shape[1] // 2
    geglu = projected[:, :inner] * F.gelu(projected[:, inner:])
    return attended + geglu @ p["tpg_ff2_w"].t() + p["tpg_ff2_b"]


def setup(tiny: FrozenCLIP, *overrides: str):
    cfg = load_config(None, ["method=fedtpg", "n_ctx=3", *overrides])
    method = create_method(cfg, tiny.logit_scale, embed_dim=tiny.embed_dim)
    return method, method.initial_global(tiny.text_width)


@pytest.mark.parametrize("heads", [4, 1])
def test_loss_and_gradients_equal_the_reference(tiny: FrozenCLIP, heads: int) -> None:
    method, start = setup(tiny, f"fedtpg.heads={heads}")
    bank = PromptBank(tiny, NAMES, n_ctx=3)
    generator = torch.Generator().manual_seed(1)
    features = F.normalize(torch.randn(6, tiny.embed_dim, generator=generator), dim=-1)
    labels = torch.tensor([0, 3, 1, 2, 2, 0])
    # Non-trivial norms and biases, so that every tensor's gradient is checked in use.
    start = {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in start.items()}

    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    loss = method.loss(params, features, labels, bank, {})
    loss.backward()

    reference = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    # Bare class names, no template: the generator's condition.
    names = tiny.encode_texts(NAMES)
    context = reference_context(reference, names, heads)
    text = tiny.encode_prompts(bank.assemble(context[None]), bank.eot)
    expected = F.cross_entropy(tiny.logit_scale * features @ text.t(), labels)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=0)
    scale = float(reference["tpg_prompt"].grad.norm())
    for key, value in params.items():
        mine, theirs = value.grad, reference[key].grad
        if key == "tpg_k_b":
            # Adding a bias to every key shifts each query's scores alike: softmax ignores it,
            # so its gradient is zero up to float noise in both.
            assert max(float(mine.norm()), float(theirs.norm())) <= 1e-5 * scale
            continue
        assert float(theirs.norm()) > 0, key
        assert float((mine - theirs).norm()) <= 1e-4 * float(theirs.norm()), key


def test_the_context_is_generated_from_the_banks_own_class_names(tiny: FrozenCLIP) -> None:
    method, start = setup(tiny)
    seen = PromptBank(tiny, NAMES, n_ctx=3)
    unseen = PromptBank(tiny, ["wine glass", "dog", "lamp"], n_ctx=3)
    with torch.no_grad():
        both = method.class_features(start, unseen)
        reference = reference_context(start, tiny.encode_texts(unseen.classnames), 4)
        from_seen = reference_context(start, tiny.encode_texts(seen.classnames), 4)
    torch.testing.assert_close(both, unseen.encode(reference), rtol=1e-4, atol=1e-6)
    # Another class list generates another context.
    assert not torch.allclose(reference, from_seen, atol=1e-4)


def test_its_defaults_are_the_authors_protocol(tiny_data: Path) -> None:
    cfg = load_config(None, tiny_overrides(tiny_data, method="fedtpg", lr=0.05))
    assert (cfg.fedtpg.label_space, cfg.fedtpg.aggregation) == ("client", "mean")
    experiment = build_experiment(cfg)
    manifest = experiment.manifest
    for cid, data in experiment.client_data.items():
        own = [experiment.splits.classnames[c] for c in manifest.clients[cid].classes]
        assert data.bank.classnames == own
        assert int(data.train_labels.max()) < len(own)
    # The server's mean ignores the sample counts.
    method = experiment.method
    server = Server(method, start_global(experiment), 2, seed=0, sample_counts={0: 1, 1: 3})
    first = {k: torch.zeros_like(v) for k, v in server.global_tensors.items()}
    second = {k: torch.ones_like(v) for k, v in server.global_tensors.items()}
    server.aggregate([Update(0, 0, first, 1), Update(1, 0, second, 3)])
    assert all(torch.all(v == 0.5) for v in server.global_tensors.values())
    # The weighted mean is the other choice.
    weighted = load_config(None, ["method=fedtpg", "fedtpg.aggregation=weighted"])
    assert create_method(weighted, 1.0, embed_dim=8).aggregation == "weighted"


def test_only_the_generator_leaves_the_client(tiny_data: Path) -> None:
    cfg = load_config(None, tiny_overrides(tiny_data, method="fedtpg", lr=0.05))
    experiment = build_experiment(cfg)
    client = clients_of(experiment)[0]
    start = start_global(experiment)
    update = client.train(start, 0)
    assert set(update.tensors) == set(experiment.method.global_keys) == set(start)
    assert client.personal == {}
    assert not torch.equal(update.tensors["tpg_prompt"], start["tpg_prompt"])


def test_heads_that_do_not_divide_the_width_are_refused(tiny: FrozenCLIP) -> None:
    cfg = load_config(None, ["method=fedtpg", "fedtpg.heads=3"])
    method = create_method(cfg, tiny.logit_scale, embed_dim=tiny.embed_dim)
    with pytest.raises(ConfigError, match=r"fedtpg\.heads: expected a divisor of the text width"):
        method.initial_global(tiny.text_width)


def test_the_flower_apps_give_the_inprocess_numbers(tiny_data: Path, tmp_path: Path) -> None:
    cfg = flower_config(tiny_data, method="fedtpg", lr=0.05)
    rows, zeroshot, _ = run_inprocess(build_experiment(cfg))
    app = make_client_app(cfg, all_clients=True, state_dir=tmp_path / "nodes")
    results = run_server(LoopbackGrid(app, {101: 0, 202: 1}), cfg, ServerSettings(tmp_path / "run"))
    assert results == build_results(cfg.to_dict(), rows, zeroshot)


def test_an_experiment_hands_fedtpg_its_label_space_beside_other_methods(
    tiny_data: Path,
) -> None:
    cfg = load_config(None, tiny_overrides(tiny_data, method="promptfl"))
    with pytest.raises(ConfigError, match="label_space client"):
        build_experiment(cfg).with_method("fedtpg")
    shared = build_experiment(cfg, label_spaces=["client"])
    assert len(shared.client_data[0].bank) == len(shared.base.bank)
    fedtpg = shared.with_method("fedtpg")
    own = shared.manifest.clients[0].classes
    assert len(fedtpg.client_data[0].bank) == len(own) < len(shared.base.bank)
    # Its zero-shot reference is measured over the same label space.
    assert fedtpg.with_method("zeroshot", fedtpg.method.label_space).client_data[0].bank is (
        fedtpg.client_data[0].bank
    )
