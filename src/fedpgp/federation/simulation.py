"""The in-process runtime: every client in one process, deterministic, the default."""

from __future__ import annotations

import logging
from collections.abc import Callable

from tqdm import tqdm

from ..evaluation import evaluate_client, summarize
from ..experiment import Experiment
from ..methods import Method, create_method
from .client import Client, ClientData, Optimizers
from .server import Server

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict], None]


def build_clients(experiment: Experiment) -> list[Client]:
    """One Client per partition entry, sharing one optimizer policy."""
    cfg = experiment.cfg
    optimizers = Optimizers(cfg.optimizer_state, cfg.lr, cfg.momentum, cfg.weight_decay)
    return [
        Client(cid, experiment.method, data, experiment.initial_personal(cid), optimizers, cfg.seed)
        for cid, data in sorted(experiment.client_data.items())
    ]


def evaluate_clients(
    experiment: Experiment, method: Method, params: dict[int, dict], data: dict[int, ClientData]
) -> list[dict]:
    """Per-client Local / Base / Novel, each client with its own prediction context."""
    return [
        {
            "id": cid,
            "n_train": data[cid].num_train,
            **evaluate_client(method, params[cid], data[cid].local, experiment.base,
                              experiment.novel),
        }
        for cid in sorted(params)
    ]


def zero_shot_reference(experiment: Experiment) -> dict:
    """CLIP zero-shot's numbers on the same clients and test sets (nothing trained)."""
    method = create_method(experiment.cfg, experiment.backbone.logit_scale, name="zeroshot")
    params = {cid: {} for cid in experiment.client_data}
    return summarize(evaluate_clients(experiment, method, params, experiment.client_data))


def run_simulation(experiment: Experiment, on_round: RoundCallback | None = None) -> dict:
    """Run every round in this process. Returns the per-round rows (with per-client metrics),
    the final per-client metrics and the final GLOBAL tensors."""
    cfg = experiment.cfg
    server = Server(experiment.method, experiment.initial_global(), cfg.num_clients, cfg.seed)
    clients = build_clients(experiment)
    rounds: list[dict] = []
    for round in tqdm(range(cfg.rounds), desc="rounds", disable=None):
        sampled = server.sample(round)
        updates = [
            clients[cid].train(server.global_tensors, round)
            for cid in tqdm(sampled, desc=f"round {round + 1}", leave=False, disable=None)
        ]
        rejected = server.aggregate(updates)
        if round == cfg.rounds - 1 or (round + 1) % cfg.eval_every == 0:
            params = {c.id: c.params(server.global_tensors) for c in clients}
            per_client = evaluate_clients(experiment, experiment.method, params,
                                          experiment.client_data)
            row = {"round": round + 1, **summarize(per_client), "sampled": sampled}
            if rejected:
                row["rejected"] = [{"client": c, "reason": r} for c, r in rejected]
            rounds.append({**row, "clients": per_client})
            log.info("round %d: local %s base %s novel %s hm %s", round + 1,
                     row["local"], row["base"], row["novel"], row["hm"])
            if on_round is not None:
                on_round(rounds[-1])
    return {"rounds": rounds, "global": server.global_tensors}
