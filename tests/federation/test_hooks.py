"""The server-side method hooks, written once and used by both runtimes: an unweighted mean, a
server that keeps every client's latest upload and hands the others' uploads out as read-only
"experts", and a leak check against exactly what the method declares it uploads.

The toy method is PromptFL with its hooks changed for one test (both runtimes build their
methods from the same class), and a loss that reads the experts it receives."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from flowerkit import LoopbackGrid, array_names, flower_config, task_identity  # noqa: F401
from torch import Tensor

from fedpgp.experiment import build_experiment
from fedpgp.federation.flower.client_app import make_client_app
from fedpgp.federation.flower.server_app import run_server
from fedpgp.federation.flower.settings import ServerSettings
from fedpgp.federation.inprocess import run_inprocess
from fedpgp.federation.server import Server
from fedpgp.federation.update import Update
from fedpgp.methods.base import Tensors, create_method, unweighted_mean
from fedpgp.methods.promptfl import PromptFL
from fedpgp.report import build_results

EXPERT = "expert/"


def expert_sends(
    self: PromptFL, client_id: int, round: int, stored: Mapping[int, Tensors]
) -> Tensors:
    """Every other client's latest upload, under its own name."""
    return {f"{EXPERT}{cid}": up["ctx"] for cid, up in sorted(stored.items()) if cid != client_id}


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, tuple[str, ...]]]:
    """Turn PromptFL into the toy method; returns, per loss call, the round's received names."""
    calls: list[tuple[int, tuple[str, ...]]] = []
    original = PromptFL.loss

    def loss(self, params, features, labels, bank, received) -> Tensor:
        experts = [v for k, v in received.items() if k.startswith(EXPERT)]
        calls.append((len(experts), tuple(sorted(received))))
        base = original(self, params, features, labels, bank, received)
        # Pulled towards the experts, so that what the server sends changes the numbers.
        pull = sum(((params["ctx"] - e) ** 2).mean() for e in experts)
        return base + 0.5 * pull

    monkeypatch.setattr(PromptFL, "aggregation", "mean")
    monkeypatch.setattr(PromptFL, "keeps_uploads", True)
    monkeypatch.setattr(PromptFL, "server_sends", expert_sends)
    monkeypatch.setattr(PromptFL, "loss", loss)
    return calls


def test_server_keeps_uploads_sends_the_others_and_takes_the_unweighted_mean(seen) -> None:
    from fedpgp.config import load_config

    method = create_method(load_config(None, ["method=promptfl"]), 100.0)
    server = Server(method, {"ctx": torch.zeros(2, 3)}, 3, seed=0, sample_counts={0: 1, 1: 9, 2: 5})
    updates = [
        Update(0, 0, {"ctx": torch.full((2, 3), 1.0)}, 1),
        Update(1, 0, {"ctx": torch.full((2, 3), 3.0)}, 9),
    ]
    accepted, faults = server.screen(0, updates, min_clients=1)
    server.aggregate(accepted)
    assert not faults
    # Unweighted, whatever the sample counts (the weighted mean would be 2.8).
    torch.testing.assert_close(server.global_tensors["ctx"], torch.full((2, 3), 2.0))
    torch.testing.assert_close(
        server.global_tensors["ctx"], unweighted_mean(updates, ["ctx"])["ctx"]
    )
    assert set(server.stored) == {0, 1}
    sends = server.sends(2, 1)
    assert set(sends) == {"ctx", "expert/0", "expert/1"}
    assert torch.equal(sends["expert/1"], updates[1].tensors["ctx"])
    assert set(server.sends(0, 1)) == {"ctx", "expert/1"}


def test_both_runtimes_use_the_hooks_and_agree(seen, tiny_data: Path, tmp_path: Path) -> None:
    cfg = flower_config(tiny_data, method="promptfl", rounds=3, eval_every=3, lr=0.05)
    rows, zeroshot, _ = run_inprocess(build_experiment(cfg))
    inprocess = build_results(cfg.to_dict(), rows, zeroshot)
    # Round 0: no uploads kept yet; later rounds: each client gets the other's upload only.
    assert [count for count, _ in seen] == [0] * (len(seen) // 3) + [1] * (2 * len(seen) // 3)
    seen.clear()

    app = make_client_app(cfg, all_clients=True, state_dir=tmp_path / "nodes")
    grid = LoopbackGrid(app, {101: 0, 202: 1})
    flower = run_server(grid, cfg, ServerSettings(out_dir=tmp_path / "run"))
    assert flower == inprocess
    # Round 3's tensor bytes: each of the 2 clients is sent ctx and one expert, and sends ctx.
    ctx_bytes = cfg.n_ctx * build_experiment(cfg).backbone.text_width * 4
    assert inprocess["rounds"][-1]["bytes"] == {"down": 2 * 2 * ctx_bytes, "up": 2 * ctx_bytes}
    assert {count for count, _ in seen} == {0, 1}
    # What left the nodes is exactly what the method uploads: ctx, never an expert.
    sent_by_nodes = array_names(tmp_path / "run" / "messages.jsonl", direction="received")
    assert set(sent_by_nodes) == set(PromptFL.global_keys)
    sent_to_nodes = set(array_names(tmp_path / "run" / "messages.jsonl", direction="sent"))
    assert sent_to_nodes == {"ctx", "expert/0", "expert/1"}
