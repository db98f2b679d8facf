"""Local / Base / Novel accuracy per client with its own prediction context, and their HM."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .experiment import ClientData, EvalSet, Experiment, stem_block
from .methods.base import Method
from .prompts import PromptBank

METRICS = ("local", "base", "novel")
# Test images run through a prompted image tower in one call: bounds its activations.
ENCODE_CHUNK = 256


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


def tensors_key(params: Mapping[str, Tensor]) -> tuple:
    """What identifies a client's prediction tensors within one evaluation: clients that
    predict with the very same tensors (the GLOBAL ones alone) share it."""
    return tuple(sorted((key, id(value)) for key, value in params.items()))


def evaluate_client(
    method: Method,
    params: Mapping[str, Tensor],
    local: EvalSet,
    base: EvalSet,
    novel: EvalSet | None,
    memo: dict[tuple, float] | None = None,
    class_features: Mapping[int, Tensor] | None = None,
    images: Tensor | None = None,
) -> dict[str, float | None]:
    """Local, Base and Novel accuracy of one client's prediction context. ``memo`` holds the
    accuracies already measured with the very same tensors on the very same sets: clients that
    predict with the GLOBAL tensors alone then measure Base and Novel once between them.
    ``class_features`` (by ``id`` of a bank) holds this client's class features already
    encoded (:func:`batched_class_features`); ``images`` the method's encoding of the sets'
    shared test features with this client's tensors (:func:`encoded_images`), read by row."""
    sets = {"local": local, "base": base, "novel": novel}
    present = {name: s for name, s in sets.items() if s is not None and len(s) > 0}
    results: dict[str, float | None] = dict.fromkeys(sets)
    # Identities are stable here: ``params`` and the sets are alive for the whole call.
    tensors = tensors_key(params)
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
    for bank_id, names in by_bank.items():
        bank = todo[names[0]].bank
        with torch.no_grad():
            if images is None:
                features = torch.cat([todo[n].features for n in names])
            else:
                features = torch.cat([images[todo[n].rows] for n in names])
            text = None if class_features is None else class_features.get(bank_id)
            if text is None and images is not None:
                text = method.class_features(params, bank)
            if text is None:
                predicted = method.predict(params, bank, features)
            else:
                predicted = method.logits(features, text).argmax(dim=-1)
        sizes = [len(todo[n]) for n in names]
        for name, chunk in zip(names, predicted.split(sizes), strict=True):
            accuracy = float((chunk == todo[name].labels).float().mean()) * 100.0
            results[name] = memo[(tensors, id(todo[name]))] = accuracy
    return results


def batched_class_features(
    experiment: Experiment, params: Mapping[int, Mapping[str, Tensor]]
) -> dict[int, dict[int, Tensor]]:
    """Client id -> (id of a bank -> its class features) for every bank a client is evaluated
    on, each bank's classes encoded for all the clients' distinct prediction tensors in one
    call; empty for a method that cannot (:attr:`~fedpgp.methods.base.Method.encodes_batched`)
    or when only one set of tensors is evaluated."""
    method = experiment.method
    distinct: dict[tuple, Mapping[str, Tensor]] = {}
    for tensors in params.values():
        distinct.setdefault(tensors_key(tensors), tensors)
    if not method.encodes_batched or len(distinct) < 2:
        return {}
    shared = [s for s in (experiment.base, experiment.novel) if s is not None and len(s) > 0]
    users: dict[int, tuple[PromptBank, dict[tuple, list[int]]]] = {}
    for cid, tensors in params.items():
        local = experiment.client_data[cid].local
        for s in [local, *shared] if len(local) > 0 else shared:
            bank_users = users.setdefault(id(s.bank), (s.bank, {}))[1]
            bank_users.setdefault(tensors_key(tensors), []).append(cid)
    out: dict[int, dict[int, Tensor]] = {cid: {} for cid in params}
    for bank_id, (bank, by_tensors) in users.items():
        keys = list(by_tensors)
        stacked = {
            name: torch.stack([distinct[key][name] for key in keys]) for name in distinct[keys[0]]
        }
        with torch.no_grad():
            features = method.batched_class_features(stacked, bank)
        for key, feature in zip(keys, features, strict=True):
            for cid in by_tensors[key]:
                out[cid][bank_id] = feature
    return out


def encoded_images(
    experiment: Experiment, tensors: Mapping[str, Tensor], clients: Sequence[int]
) -> Tensor | None:
    """For a method that runs its stems through the image tower with its own tensors: the
    encoding with ``tensors`` of the experiment's shared test features (``EvalSet.source``), at
    the rows that the Local, Base and Novel sets of ``clients`` (who all predict with
    ``tensors``) read; the other rows are zero. None for any other method."""
    method = experiment.method
    if stem_block(method.image_kind) is None:
        return None
    source = experiment.base.source
    sets = [experiment.base, experiment.novel]
    sets += [experiment.client_data[cid].local for cid in clients]
    rows = torch.unique(torch.cat([s.rows for s in sets if s is not None]))
    with torch.no_grad():
        parts = [method.encode_images(tensors, source[part]) for part in rows.split(ENCODE_CHUNK)]
    images = parts[0].new_zeros(source.shape[0], *parts[0].shape[1:])
    images[rows] = torch.cat(parts)
    return images


def evaluate_clients(
    experiment: Experiment, params: Mapping[int, Mapping[str, Tensor]]
) -> list[dict]:
    """Per-client rows {id, n_train, local, base, novel} of the clients in ``params`` (client id
    -> the tensors it predicts with), each with its own prediction context, by client id. A
    method that can batch encodes each class set once for all the clients; a method with
    prompts in the image tower encodes the test images once per distinct set of tensors (once
    for all clients that predict with the GLOBAL tensors alone), one set at a time."""
    data: Mapping[int, ClientData] = experiment.client_data
    memo: dict[tuple, float] = {}
    encoded = batched_class_features(experiment, params)
    by_tensors: dict[tuple, list[int]] = {}
    for cid in sorted(params):
        by_tensors.setdefault(tensors_key(params[cid]), []).append(cid)
    rows = {}
    for clients in by_tensors.values():
        images = encoded_images(experiment, params[clients[0]], clients)
        for cid in clients:
            rows[cid] = {
                "id": cid,
                "n_train": data[cid].num_train,
                **evaluate_client(
                    experiment.method,
                    params[cid],
                    data[cid].local,
                    experiment.base,
                    experiment.novel,
                    memo,
                    encoded.get(cid),
                    images,
                ),
            }
    return [rows[cid] for cid in sorted(params)]


def zero_shot_rows(experiment: Experiment, clients: Sequence[int]) -> list[dict]:
    """CLIP zero-shot's rows for ``clients`` on the same test sets (nothing trained), on pooled
    features whatever the experiment's method reads, over the same label space."""
    zeroshot = experiment.with_method("zeroshot", experiment.method.label_space)
    return evaluate_clients(zeroshot, {cid: {} for cid in clients})
