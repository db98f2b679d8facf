"""Evaluation encodes each prompt bank once per client and gives the per-set accuracies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runkit import start_global, start_personal
from tiny import tiny_overrides

from fedpgp.config import load_config
from fedpgp.evaluation import evaluate_client
from fedpgp.experiment import build_experiment
from fedpgp.prompts import PromptBank


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
