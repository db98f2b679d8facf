"""Local / Base / Novel accuracy per client with its own prediction context, and their HM."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .experiment import ClientData, EvalSet, Experiment
from .methods.base import Method

METRICS = ("local", "base", "novel")


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
    memo: dict[tuple, float] | None = None,
) -> dict[str, float | None]:
    """Local, Base and Novel accuracy of one client's prediction context. ``memo`` holds the
    accuracies already measured with the very same tensors on the very same sets: clients that
    predict with the GLOBAL tensors alone then measure Base and Novel once between them."""
    sets = {"local": local, "base": base, "novel": novel}
    present = {name: s for name, s in sets.items() if s is not None and len(s) > 0}
    results: dict[str, float | None] = dict.fromkeys(sets)
    # Identities are stable here: ``params`` and the sets are alive for the whole call.
    tensors = tuple(sorted((key, id(value)) for key, value in params.items()))
    memo = {} if memo is None else memo
    todo: dict[str, EvalSet] = {}
    for name, s in present.items():
        known = memo.get((tensors, id(s)))
        if known is None:
            todo[name] = s
        else:
            results[name] = known
    # Sets that share a bank (Local and Base when the label space is all base classes) are
    # predicted in one call, so the bank's classes are encoded once.
    by_bank: dict[int, list[str]] = {}
    for name, s in todo.items():
        by_bank.setdefault(id(s.bank), []).append(name)
    for names in by_bank.values():
        features = torch.cat([todo[n].features for n in names])
        with torch.no_grad():
            predicted = method.predict(params, todo[names[0]].bank, features)
        sizes = [len(todo[n]) for n in names]
        for name, chunk in zip(names, predicted.split(sizes), strict=True):
            accuracy = float((chunk == todo[name].labels).float().mean()) * 100.0
            results[name] = memo[(tensors, id(todo[name]))] = accuracy
    return results


def evaluate_clients(
    experiment: Experiment, params: Mapping[int, Mapping[str, Tensor]]
) -> list[dict]:
    """Per-client rows {id, n_train, local, base, novel} of the clients in ``params`` (client id
    -> the tensors it predicts with), each with its own prediction context, by client id."""
    data: Mapping[int, ClientData] = experiment.client_data
    memo: dict[tuple, float] = {}
    return [
        {
            "id": cid,
            "n_train": data[cid].num_train,
            **evaluate_client(
                experiment.method,
                params[cid],
                data[cid].local,
                experiment.base,
                experiment.novel,
                memo,
            ),
        }
        for cid in sorted(params)
    ]


def zero_shot_rows(experiment: Experiment, clients: Sequence[int]) -> list[dict]:
    """CLIP zero-shot's rows for ``clients`` on the same test sets (nothing trained), on pooled
    features whatever the experiment's method reads, over the same label space."""
    zeroshot = experiment.with_method("zeroshot", experiment.method.label_space)
    return evaluate_clients(zeroshot, {cid: {} for cid in clients})
