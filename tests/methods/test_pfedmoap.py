"""pFedMoAP against a reference written from its specification (loss and gradients, with and
without experts), the server's choice of experts, what leaves a client and what it keeps,
prediction honouring the expert mask, refusal of bad experts and bad settings, and the Flower
apps giving the in-process numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from flowerkit import LoopbackGrid, array_names, flower_config, task_identity  # noqa: F401
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
from fedpgp.methods.pfedmoap import GATING, PFedMoAP
from fedpgp.prompts import PromptBank
from fedpgp.report import build_results

NAMES = ["dog", "red striped triangle", "cat", "wine glass"]
N_CTX = 4


@pytest.fixture(scope="module")
def tiny() -> FrozenCLIP:
    return FrozenCLIP.load(BackboneSpec("fedpgp-tiny", None))


def tiny_method(tiny: FrozenCLIP, *overrides: str) -> PFedMoAP:
    cfg = load_config(None, ["method=pfedmoap", f"n_ctx={N_CTX}", *overrides])
    method = create_method(cfg, tiny.logit_scale, embed_dim=tiny.embed_dim)
    assert isinstance(method, PFedMoAP)
    return method


def image_features(tiny: FrozenCLIP, count: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(count, tiny.embed_dim, generator=generator), dim=-1)


def prompts(tiny: FrozenCLIP, count: int, seed: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(N_CTX, tiny.text_width, generator=generator) * 0.02 for _ in range(count)]


def reference_loss(
    tiny: FrozenCLIP,
    bank: PromptBank,
    ctx: torch.Tensor,
    experts: list[torch.Tensor],
    gate: dict[str, torch.Tensor],
    features: torch.Tensor,
    labels: torch.Tensor,
    gating_dim: int,
    heads: int,
    kappa: float,
    lam: float,
) -> torch.Tensor:
    """The specification one image, class and head at a time, each text feature from the
    plain text tower: logit_c = lam s f.t_c + s pi(f).o_c, or s f.t_c without experts."""

    def encode(context: torch.Tensor) -> torch.Tensor:
        return tiny.encode_prompts(bank.assemble(context[None]), bank.eot)

    def linear(name: str, x: torch.Tensor) -> torch.Tensor:
        return gate[f"gate_w{name}"] @ x + gate[f"gate_b{name}"]

    s = tiny.logit_scale
    t = encode(ctx)
    with torch.no_grad():
        t_experts = [encode(e) for e in experts]
    d = min(gating_dim, tiny.embed_dim)
    stride, d_k = tiny.embed_dim // d, d // heads
    total = torch.zeros(())
    for f, y in zip(features, labels, strict=True):
        q = f[::stride]
        query = linear("q", q)
        logits = []
        for c in range(len(NAMES)):
            if not experts:
                logits.append(s * (f @ t[c]))
                continue
            rows = [t[c][::stride]] + [te[c][::stride] for te in t_experts]
            keys = [linear("k", r) for r in rows]
            values = [linear("v", r) for r in rows]
            per_head = []
            for h in range(heads):
                part = slice(h * d_k, (h + 1) * d_k)
                scores = torch.stack([kappa * (query[part] @ k[part]) for k in keys])
                weights = torch.softmax(scores, dim=0)
                per_head.append(sum(w * v[part] for w, v in zip(weights, values, strict=True)))
            o = linear("o", torch.cat(per_head))
            logits.append(lam * s * (f @ t[c]) + s * (q @ o))
        stacked = torch.stack(logits)
        total = total + torch.logsumexp(stacked, dim=0) - stacked[int(y)]
    return total / len(labels)


@pytest.mark.parametrize("num_received", [2, 0])
def test_loss_and_gradients_equal_the_reference(tiny: FrozenCLIP, num_received: int) -> None:
    # gating_dim 16 of E = 32: pi keeps every second entry; 4 heads of d_k = 4.
    settings = ["pfedmoap.gating_dim=16", "pfedmoap.gating_heads=4", "pfedmoap.scaling=3.0"]
    method = tiny_method(tiny, "num_clients=6", "pfedmoap.num_experts=3", *settings)
    width = tiny.text_width
    start = {**method.initial_global(width), **method.initial_personal(width, 0)}
    bank = PromptBank(tiny, NAMES, n_ctx=N_CTX)
    features = image_features(tiny, 5)
    labels = torch.tensor([0, 3, 1, 2, 2])
    experts = prompts(tiny, num_received)
    # Sent in no particular order; the names say whose they are.
    received = {"ctx": start["ctx"], **{f"expert/{5 - 3 * i}": e for i, e in enumerate(experts)}}

    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    loss = method.loss(params, features, labels, bank, received)
    loss.backward()

    ctx = start["ctx"].clone().requires_grad_(True)
    gate = {k: start[k].clone().requires_grad_(True) for k in GATING}
    expected = reference_loss(
        tiny, bank, ctx, experts, gate, features, labels, 16, 4, kappa=3.0, lam=0.5
    )
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=0)
    # Relative to the gradient's norm: float32 noise of two encoder paths on near-zero entries.
    pairs = [(params["ctx"].grad, ctx.grad)]
    if num_received:
        # Three biases shift every logit of an image alike, which the softmaxes cancel: b_k
        # every expert's score, b_v (the weights sum to 1) and b_o every class's logit. Their
        # gradient is zero up to float noise, in both.
        for name in ("k", "v", "o"):
            scale = float(gate[f"gate_w{name}"].grad.norm())
            for grad in (params[f"gate_b{name}"].grad, gate[f"gate_b{name}"].grad):
                assert float(grad.norm()) <= 1e-4 * scale
        live = ("gate_wq", "gate_bq", "gate_wk", "gate_wv", "gate_wo")
        pairs += [(params[k].grad, gate[k].grad) for k in live]
    for mine, reference in pairs:
        assert float((mine - reference).norm()) <= 1e-4 * float(reference.norm()) + 1e-12
    if not num_received:
        # Plain CoOp: the gating takes no part.
        assert all(params[k].grad is None for k in GATING)
    # Nothing but ctx and the gating is trained.
    assert all(params[k].grad is None for k in ("ctx_local", "experts", "expert_mask"))


def test_the_server_sends_the_nearest_latest_uploads_of_others(tiny: FrozenCLIP) -> None:
    method = tiny_method(tiny, "num_clients=6", "pfedmoap.num_experts=3")
    shape = (N_CTX, tiny.text_width)
    server = Server(method, {"ctx": torch.zeros(shape)}, 6, seed=0)
    assert server.sends(0, 0).keys() == {"ctx"}  # round 0: nothing kept yet

    def upload(cid: int, round: int, value: float) -> Update:
        return Update(cid, round, {"ctx": torch.full(shape, value)}, 4)

    # Client 5 never sends a usable update.
    first = [upload(0, 0, 5.0), upload(1, 0, -1.0), upload(2, 0, 0.0), upload(3, 0, 1.0)]
    accepted, _ = server.screen(0, [*first, upload(4, 0, 9.0)], min_clients=1)
    server.aggregate(accepted)
    # A later round replaces the kept uploads of clients 0 and 4 with their latest.
    latest = upload(4, 1, 0.5)
    accepted, _ = server.screen(1, [upload(0, 1, 6.0), latest], min_clients=1)
    server.aggregate(accepted)

    sends = server.sends(2, 2)
    # The 2 nearest to client 2's own (0.0): client 4 (0.5), then 1 and 3 tie (1.0), lower id.
    assert set(sends) == {"ctx", "expert/1", "expert/4"}
    assert sends["expert/1"] is first[1].tensors["ctx"]
    assert sends["expert/4"] is latest.tensors["ctx"]
    # Uploads as sent, never averaged: the GLOBAL ctx is the mean, the experts are not.
    assert not torch.equal(sends["ctx"], sends["expert/4"])
    # Client 5 has no kept prompt: nearest to the mean of the others' (1.3).
    assert set(method.server_sends(5, 2, server.stored)) == {"expert/3", "expert/4"}
    for cid in range(6):
        chosen = method.server_sends(cid, 2, server.stored)
        assert len(chosen) == 2 and f"expert/{cid}" not in chosen
    # With at most num_experts - 1 others, all of them.
    few = {cid: server.stored[cid] for cid in (0, 3)}
    assert set(method.server_sends(3, 2, few)) == {"expert/0"}
    assert set(method.server_sends(1, 2, few)) == {"expert/0", "expert/3"}


def test_only_ctx_leaves_and_the_client_keeps_what_it_received(
    tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(None, tiny_overrides(tiny_data, method="pfedmoap", lr=0.05))
    experiment = build_experiment(cfg)
    clients = clients_of(experiment)
    received = start_global(experiment)
    first, other = clients[0].personal, clients[1].personal
    # One common gating; the kept prompt starts as the run's initial GLOBAL ctx.
    assert all(torch.equal(first[k], other[k]) for k in GATING)
    assert torch.equal(first["ctx_local"], received["ctx"])

    update = clients[0].train(received, 0)
    kept = clients[0].personal
    assert set(update.tensors) == {"ctx"}
    assert set(kept) == set(PFedMoAP.personal_keys)
    assert torch.equal(kept["ctx_local"], update.tensors["ctx"])
    assert not kept["expert_mask"].any()
    # No experts in round 0: plain CoOp, the gating untouched.
    assert all(torch.equal(kept[k], first[k]) for k in GATING)

    encodes: list[bool] = []
    encode = PromptBank.encode

    def counting(self: PromptBank, contexts: torch.Tensor) -> torch.Tensor:
        encodes.append(torch.is_grad_enabled())
        return encode(self, contexts)

    monkeypatch.setattr(PromptBank, "encode", counting)
    expert = clients[1].train(received, 0).tensors["ctx"]
    encodes.clear()
    before = dict(clients[0].personal)
    update = clients[0].train({**received, "expert/1": expert}, 1)
    kept = clients[0].personal
    # The experts are encoded once in the round, the client's prompt once per step.
    assert encodes.count(False) == 1 and encodes.count(True) >= 1
    # Only the trained prompt leaves; the gating it trained and the experts stay.
    assert set(update.tensors) == {"ctx"}
    assert torch.equal(update.tensors["ctx"], kept["ctx_local"])
    assert torch.equal(kept["experts"][0], expert)
    assert kept["expert_mask"].tolist() == [1.0]
    assert all(not torch.equal(kept[k], before[k]) for k in GATING[::2])


def test_prediction_leaves_a_masked_slot_out(tiny: FrozenCLIP) -> None:
    method = tiny_method(tiny, "num_clients=3")  # num_experts 3: two slots
    width = tiny.text_width
    params = {**method.initial_global(width), **method.initial_personal(width, 0)}
    params["ctx_local"] = prompts(tiny, 1, seed=7)[0]
    filled, spare = prompts(tiny, 2, seed=8)
    bank = PromptBank(tiny, NAMES, n_ctx=N_CTX)
    features = image_features(tiny, 6)

    def logits(slot: torch.Tensor, mask: list[float]) -> torch.Tensor:
        state = {
            **params,
            "experts": torch.stack([filled, slot]),
            "expert_mask": torch.tensor(mask),
        }
        with torch.no_grad():
            return method.image_logits(state, bank, features)

    masked = logits(spare, [1.0, 0.0])
    assert torch.equal(masked, logits(torch.full_like(spare, float("nan")), [1.0, 0.0]))
    assert torch.equal(masked, logits(torch.zeros_like(spare), [1.0, 0.0]))
    assert not torch.allclose(masked, logits(spare, [1.0, 1.0]))
    # The same as a client with one slot holding only the filled expert.
    single = tiny_method(tiny, "num_clients=3", "pfedmoap.num_experts=2")
    one = {**params, "experts": filled[None], "expert_mask": torch.ones(1)}
    with torch.no_grad():
        assert torch.equal(masked, single.image_logits(one, bank, features))
        # Every slot masked: CoOp with the kept prompt.
        coop = tiny.logit_scale * features @ bank.encode(params["ctx_local"]).t()
    assert torch.equal(logits(spare, [0.0, 0.0]), coop)
    # Several views at once: (V, N, E) -> (V, N).
    state = {**params, "experts": torch.stack([filled, spare]), "expert_mask": torch.ones(2)}
    views = torch.stack([features, features.flip(0)])
    predicted = method.predict(state, bank, views)
    assert predicted.shape == (2, 6)
    assert torch.equal(predicted[1], predicted[0].flip(0))


# The tiny CLIP's text width is 64.
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.zeros(N_CTX, 65), r"'expert/3' has shape \(4, 65\), expected \(4, 64\)"),
        (torch.zeros(N_CTX, 64, dtype=torch.float64), r"'expert/3' has dtype torch.float64"),
        (torch.full((N_CTX, 64), float("nan")), r"'expert/3' has non-finite values"),
    ],
)
def test_a_bad_expert_is_refused(tiny: FrozenCLIP, bad: torch.Tensor, message: str) -> None:
    method = tiny_method(tiny, "num_clients=4")
    width = tiny.text_width
    params = {**method.initial_global(width), **method.initial_personal(width, 0)}
    received = {"ctx": params["ctx"], "expert/1": prompts(tiny, 1)[0], "expert/3": bad}
    bank = PromptBank(tiny, NAMES, n_ctx=N_CTX)
    with pytest.raises(ValueError, match=message):
        method.loss(params, image_features(tiny, 2), torch.tensor([0, 1]), bank, received)
    with pytest.raises(ValueError, match=message):
        method.keep(params, received)
    too_many = {f"expert/{cid}": prompts(tiny, 1)[0] for cid in range(4)}
    with pytest.raises(ValueError, match=r"received 4 experts, expected at most .* = 3"):
        method.keep(params, too_many)
    with pytest.raises(ValueError, match=r"'expert/x': expected a name expert/<client id>"):
        method.keep(params, {"expert/x": prompts(tiny, 1)[0]})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pfedmoap.num_experts=0"], r"pfedmoap\.num_experts: expected a value >= 1"),
        (["pfedmoap.num_experts=3"], r"pfedmoap\.num_experts: expected at most num_clients \(2\)"),
    ],
)
def test_num_experts_outside_1_num_clients_is_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["method=pfedmoap", "num_clients=2", *overrides])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["pfedmoap.gating_dim=12"], "pfedmoap.gating_dim"),
        (["pfedmoap.gating_heads=5"], "pfedmoap.gating_heads"),
    ],
)
def test_a_gating_that_cannot_split_the_embed_dim_is_refused(
    tiny: FrozenCLIP, overrides: list[str], key: str
) -> None:
    with pytest.raises(ConfigError, match=key):
        tiny_method(tiny, *overrides)


def test_the_flower_apps_give_the_inprocess_numbers(tiny_data: Path, tmp_path: Path) -> None:
    cfg = flower_config(tiny_data, method="pfedmoap", lr=0.05)
    rows, zeroshot, _ = run_inprocess(build_experiment(cfg))
    app = make_client_app(cfg, all_clients=True, state_dir=tmp_path / "nodes")
    results = run_server(LoopbackGrid(app, {101: 0, 202: 1}), cfg, ServerSettings(tmp_path / "run"))
    assert results == build_results(cfg.to_dict(), rows, zeroshot)
    messages = tmp_path / "run" / "messages.jsonl"
    # Only ctx left the nodes; each node was sent the global ctx and the other's upload.
    assert set(array_names(messages, direction="received")) == {"ctx"}
    assert set(array_names(messages, direction="sent")) == {"ctx", "expert/0", "expert/1"}
