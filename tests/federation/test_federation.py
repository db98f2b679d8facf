"""Client, Server and Update: personal state never leaves, aggregation and sampling rules."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch
from runkit import clients_of, start_global, start_personal
from safetensors.torch import save
from tiny import tiny_overrides

from fedpgp.config import load_config
from fedpgp.experiment import build_experiment
from fedpgp.federation.server import Server, sample_clients
from fedpgp.federation.update import Update
from fedpgp.methods.base import weighted_mean


@pytest.fixture(scope="module")
def experiment(tiny_data: Path):
    return build_experiment(load_config(None, tiny_overrides(tiny_data, num_clients=3)))


def test_update_of_fedpgp_client_holds_sigma_only(experiment) -> None:
    clients = clients_of(experiment)
    update = clients[0].train(start_global(experiment), 0)
    assert set(update.tensors) == {"sigma"}
    personal = clients[0].personal
    assert set(personal) == {"U", "V"}
    serialized = [pickle.dumps(update), save(update.tensors)]
    buffer = io.BytesIO()
    torch.save(update, buffer)
    serialized.append(buffer.getvalue())
    for blob in serialized:
        for tensor in personal.values():
            assert tensor.numpy().tobytes() not in blob
    for field_value in vars(update).values():
        if isinstance(field_value, dict):
            assert not {"U", "V"} & set(field_value)


def test_unsampled_client_keeps_its_own_personal_tensors_and_gets_new_sigma(experiment) -> None:
    clients = clients_of(experiment)
    server = Server(experiment.method, start_global(experiment), 3, seed=0)
    before = {k: v.clone() for k, v in clients[2].personal.items()}
    updates = [clients[c].train(server.global_tensors, 1) for c in (0, 1)]
    server.aggregate(updates)
    assert all(torch.equal(before[k], clients[2].personal[k]) for k in before)
    params = clients[2].params(server.global_tensors)
    assert torch.equal(params["sigma"], server.global_tensors["sigma"])
    assert not torch.equal(params["sigma"], start_global(experiment)["sigma"])
    assert torch.equal(params["U"], before["U"])
    trained = clients[0].personal
    assert not torch.equal(trained["U"], start_personal(experiment, 0)["U"])


def test_aggregation_is_the_sample_weighted_mean() -> None:
    a = Update(0, 1, {"ctx": torch.full((2, 3), 1.0)}, num_samples=1)
    b = Update(1, 1, {"ctx": torch.full((2, 3), 4.0)}, num_samples=3)
    mean = weighted_mean([a, b], ("ctx",))["ctx"]
    assert torch.allclose(mean, torch.full((2, 3), (1.0 * 1 + 4.0 * 3) / 4))


def test_server_drops_unsound_updates(experiment) -> None:
    counts = {cid: 4 for cid in range(7)}
    server = Server(experiment.method, start_global(experiment), 7, seed=0, sample_counts=counts)
    sigma = server.global_tensors["sigma"]
    good = Update(0, 1, {"sigma": sigma + 1.0}, num_samples=4)
    bad = [
        Update(1, 1, {"sigma": torch.full_like(sigma, float("nan"))}, num_samples=4),
        Update(2, 1, {"sigma": sigma[:2]}, num_samples=4),
        Update(3, 1, {"sigma": sigma, "U": torch.zeros(2)}, num_samples=4),
        Update(4, 1, {"sigma": sigma}, num_samples=0),
        Update(5, 1, {"sigma": sigma.double()}, num_samples=4),
        # A client that claims more samples than the partition gave it, to weigh itself up.
        Update(6, 1, {"sigma": sigma}, num_samples=4000),
        Update(7, 1, {"sigma": sigma}, num_samples=4),
    ]
    accepted, faults = server.screen(0, [good, *bad], min_clients=1)
    assert accepted == [good]
    reasons = {fault.client: fault.reason for fault in faults}
    assert list(reasons) == [1, 2, 3, 4, 5, 6, 7]
    assert "non-finite" in reasons[1] and "shape" in reasons[2] and "'U'" in reasons[3]
    assert "dtype" in reasons[5] and "holds 4 training samples" in reasons[6]
    assert "unknown client" in reasons[7]
    server.aggregate(accepted)
    assert torch.allclose(server.global_tensors["sigma"], sigma + 1.0)


def test_sampling_rule() -> None:
    assert sample_clients(0, 10, 0.1, seed=0) == list(range(10))
    draws = [sample_clients(r, 100, 0.1, seed=0) for r in range(1, 6)]
    assert all(len(d) == 10 and len(set(d)) == 10 for d in draws)
    assert draws == [sample_clients(r, 100, 0.1, seed=0) for r in range(1, 6)]
    assert draws != [sample_clients(r, 100, 0.1, seed=1) for r in range(1, 6)]
    assert len({tuple(d) for d in draws}) > 1
    assert sample_clients(3, 5, 0.01, seed=0).__len__() == 1
    assert sample_clients(3, 10, 1.0, seed=4) == list(range(10))


@pytest.mark.parametrize("grad_clip", [None, 1e-3])
def test_grad_clip_bounds_the_step(tiny_data: Path, grad_clip: float | None) -> None:
    # Plain SGD, one batch: the step is lr times the (clipped) gradient.
    overrides = tiny_overrides(
        tiny_data,
        method="promptfl",
        lr=1.0,
        momentum=0,
        weight_decay=0,
        batch_size=1000,
        grad_clip="null" if grad_clip is None else grad_clip,
    )
    experiment = build_experiment(load_config(None, overrides))
    start = start_global(experiment)
    update = clients_of(experiment)[0].train(start, 0)
    step = float((update.tensors["ctx"] - start["ctx"]).norm())
    if grad_clip is None:
        assert step > 10 * 1e-3
    else:
        assert step == pytest.approx(grad_clip, rel=1e-4)
