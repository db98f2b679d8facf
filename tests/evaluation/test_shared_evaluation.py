"""Evaluation encodes each prompt bank once per client and gives the per-set accuracies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runkit import start_global, start_personal
from tiny import tiny_overrides

from fedpgp.config import load_config
from fedpgp.evaluation import evaluate_client, evaluate_clients
from fedpgp.experiment import build_experiment
from fedpgp.federation.inprocess import InProcess
from fedpgp.prompts import PromptBank


def each_alone(experiment, params: dict) -> list[dict]:
    """Every client's row as evaluate_client gives it for that client alone."""
    return [
        {
            "id": cid,
            "n_train": experiment.client_data[cid].num_train,
            **evaluate_client(
                experiment.method,
                params[cid],
                experiment.client_data[cid].local,
                experiment.base,
                experiment.novel,
            ),
        }
        for cid in sorted(params)
    ]


@pytest.mark.parametrize("label_space", ["all", "client"])
def test_evaluate_client_equals_per_set_accuracy_with_one_pass_per_bank(
    tiny_data: Path, label_space: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(overrides=tiny_overrides(tiny_data, label_space=label_space, n_ctx=4))
    experiment = build_experiment(cfg)
    method, data = experiment.method, experiment.client_data[0]
    params = {**start_global(experiment), **start_personal(experiment, 0)}
    sets = {"local": data.local, "base": experiment.base, "novel": experiment.novel}

    def accuracy(s) -> float:
        # Each set on its own: one prediction pass, one encoding of its bank.
        with torch.no_grad():
            predicted = method.predict(params, s.bank, s.features)
        return float((predicted == s.labels).float().mean()) * 100.0

    expected = {name: accuracy(s) for name, s in sets.items()}
    encoded = []
    original = PromptBank.encode

    def counting(bank: PromptBank, contexts):
        encoded.append(bank)
        return original(bank, contexts)

    monkeypatch.setattr(PromptBank, "encode", counting)
    assert evaluate_client(method, params, data.local, experiment.base, experiment.novel) == (
        expected
    )
    assert len(encoded) == (2 if label_space == "all" else 3)
    assert all(value is not None for value in expected.values())


def test_clients_with_the_same_tensors_measure_base_and_novel_once(
    tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(overrides=tiny_overrides(tiny_data, method="promptfl", n_ctx=4))
    experiment = build_experiment(cfg)
    shared = start_global(experiment)
    alone = {
        cid: evaluate_client(
            experiment.method, shared, data.local, experiment.base, experiment.novel
        )
        for cid, data in experiment.client_data.items()
    }
    predicted: list[int] = []
    original = type(experiment.method).predict

    def counting(self, params, bank, features):
        predicted.append(len(features))
        return original(self, params, bank, features)

    monkeypatch.setattr(type(experiment.method), "predict", counting)
    rows = evaluate_clients(experiment, dict.fromkeys(experiment.client_data, shared))
    assert {row["id"]: {k: row[k] for k in ("local", "base", "novel")} for row in rows} == alone
    locals_ = [len(d.local) for d in experiment.client_data.values()]
    # Client 0 predicts Local with Base, then Novel; client 1 only its own Local.
    assert predicted == [
        locals_[0] + len(experiment.base),
        len(experiment.novel),
        locals_[1],
    ]
    # Different tensors (a personal method's) are measured for each client, from class
    # features encoded for both clients at once: one encoder call per bank.
    encoded: list[int] = []
    original_encode = PromptBank.encode

    def counting_encode(bank: PromptBank, contexts):
        encoded.append(len(contexts))
        return original_encode(bank, contexts)

    monkeypatch.setattr(PromptBank, "encode", counting_encode)
    predicted.clear()
    copies = {cid: {k: v.clone() for k, v in shared.items()} for cid in experiment.client_data}
    rows = evaluate_clients(experiment, copies)
    assert {row["id"]: {k: row[k] for k in ("local", "base", "novel")} for row in rows} == alone
    assert predicted == []
    assert encoded == [len(copies), len(copies)]


@pytest.mark.parametrize("label_space", ["all", "client"])
@pytest.mark.parametrize(
    "method", ["local", "promptfl", "fedprox", "fedpgp", "fedotp", "promptfolio", "fedtpg"]
)
def test_batched_evaluation_equals_each_client_alone(
    tiny_data: Path, method: str, label_space: str
) -> None:
    cfg = load_config(
        overrides=tiny_overrides(tiny_data, method=method, label_space=label_space, n_ctx=4)
    )
    experiment = build_experiment(cfg)
    generator = torch.Generator().manual_seed(3)
    # Every client's own tensors, moved off their shared start so that each predicts apart.
    params = {
        cid: {
            k: v + 0.05 * torch.randn(v.shape, generator=generator)
            for k, v in {**start_global(experiment), **start_personal(experiment, cid)}.items()
        }
        for cid in experiment.client_data
    }
    alone = each_alone(experiment, params)
    assert evaluate_clients(experiment, params) == alone


@pytest.mark.parametrize(("method", "shared"), [("ivlp", True), ("fedmgp", False)])
def test_prompted_image_towers_encode_the_test_images_once_per_distinct_tensors(
    tiny_data: Path, method: str, shared: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A method whose tensors are all GLOBAL encodes every test image once per evaluation for
    every client; one with PERSONAL tensors once per client; both give each set's own
    predictions."""
    experiment = build_experiment(load_config(overrides=tiny_overrides(tiny_data, method=method)))
    clients = InProcess(experiment).clients
    received = start_global(experiment)
    for client in clients.values():
        client.train(received, 0)
    params = {cid: client.params(received) for cid, client in clients.items()}
    alone = each_alone(experiment, params)
    encoded: list[int] = []
    cls = type(experiment.method)
    original = cls.encode_images

    def counting(self, tensors, features):
        encoded.append(len(features))
        return original(self, tensors, features)

    monkeypatch.setattr(cls, "encode_images", counting)
    assert evaluate_clients(experiment, params) == alone
    # Every client's Local set lies in the Base test set here, so the images a client needs
    # are Base and Novel.
    needed = len(experiment.base) + len(experiment.novel)
    assert sum(encoded) == needed * (1 if shared else len(clients))
