"""Local / Base / Novel accuracy per client with its own prediction context, and their HM."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .methods import Method
from .prompts import PromptBank

METRICS = ("local", "base", "novel")


@dataclass
class EvalSet:
    """Frozen features of a test set and its labels as indices into ``bank``."""

    features: Tensor
    labels: Tensor
    bank: PromptBank

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def accuracy(
    method: Method,
    params: Mapping[str, Tensor],
    features: Tensor,
    labels: Tensor,
    bank: PromptBank,
) -> float | None:
    """Top-1 accuracy in percent; None for an empty set."""
    if labels.numel() == 0:
        return None
    with torch.no_grad():
        predicted = method.predict(params, bank, features)
    return float((predicted == labels).float().mean()) * 100.0


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean of the available values (a metric may be absent, e.g. no novel classes)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if any(v <= 0 for v in present):
        return 0.0
    return len(present) / sum(1.0 / v for v in present)


def mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summarize(per_client: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Unweighted means over clients of each metric, and the HM of the three means."""
    summary = {m: mean_or_none([row[m] for row in per_client]) for m in METRICS}
    summary["hm"] = harmonic_mean([summary[m] for m in METRICS])
    return summary


def evaluate_client(
    method: Method,
    params: Mapping[str, Tensor],
    local: EvalSet,
    base: EvalSet,
    novel: EvalSet | None,
) -> dict[str, float | None]:
    """Local, Base and Novel accuracy of one client's prediction context."""
    sets = {"local": local, "base": base, "novel": novel}
    present = {name: s for name, s in sets.items() if s is not None and len(s) > 0}
    results: dict[str, float | None] = dict.fromkeys(sets)
    # Sets that share a bank (Local and Base when the label space is all base classes) are
    # predicted in one call, so the bank's classes are encoded once.
    by_bank: dict[int, list[str]] = {}
    for name, s in present.items():
        by_bank.setdefault(id(s.bank), []).append(name)
    for names in by_bank.values():
        features = torch.cat([present[n].features for n in names])
        with torch.no_grad():
            predicted = method.predict(params, present[names[0]].bank, features)
        sizes = [len(present[n]) for n in names]
        for name, chunk in zip(names, predicted.split(sizes), strict=True):
            results[name] = float((chunk == present[name].labels).float().mean()) * 100.0
    return results
