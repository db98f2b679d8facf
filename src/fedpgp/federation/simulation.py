"""The in-process runtime: every client in one process, deterministic, the default.

After every ``checkpoint_every`` rounds (and before the first) the whole run state goes to a
``save`` callback (fedpgp.checkpoint); a run started from such a state gives the same rows,
bit for bit, as one that never stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tqdm import tqdm

from ..checkpoint import RunState, capture_rng, restore_rng
from ..evaluation import evaluate_client, summarize
from ..experiment import Experiment
from ..methods import Method
from .client import Client, ClientData, Optimizers
from .faults import screen_replies, train_or_fault
from .server import Server

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict], None]
SaveCallback = Callable[[RunState], None]


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
            **evaluate_client(
                method, params[cid], data[cid].local, experiment.base, experiment.novel
            ),
        }
        for cid in sorted(params)
    ]


def zero_shot_reference(experiment: Experiment) -> dict:
    """CLIP zero-shot's numbers on the same clients and test sets (nothing trained), on pooled
    features whatever the experiment's method reads."""
    zeroshot = experiment.with_method("zeroshot")
    params = {cid: {} for cid in zeroshot.client_data}
    return summarize(evaluate_clients(zeroshot, zeroshot.method, params, zeroshot.client_data))


def capture_state(
    round: int, server: Server, clients: list[Client], rows: list[dict], pending: list[dict]
) -> RunState:
    """The run after ``round`` completed rounds, for a checkpoint."""
    return RunState(
        round=round,
        global_tensors=dict(server.global_tensors),
        personal={c.id: dict(c.personal) for c in clients},
        optimizer=clients[0].optimizers.state_dict() if clients else {},
        rows=list(rows),
        pending_faults=list(pending),
        rng=capture_rng(),
    )


def restore_state(
    state: RunState, server: Server, clients: list[Client], device: torch.device
) -> None:
    """Put the server, the clients, the shared optimizer and the global RNGs back where
    ``state`` was (its tensors checked beforehand by Checkpoint.check_fits)."""
    # Keys in the method's order, not the file's: the shared optimizer indexes its buffers by
    # the position of each tensor in {**global, **personal}.
    server.global_tensors = {k: state.global_tensors[k].to(device) for k in server.global_tensors}
    for client in clients:
        saved = state.personal.get(client.id, {})  # methods without PERSONAL tensors save none
        client.personal = {k: saved[k].to(device) for k in client.personal}
    if state.optimizer:
        # The shared optimizer exists once any client trained; build it, then load its state.
        _, optimizer = clients[0].optimizers.prepare(clients[0].params(server.global_tensors))
        optimizer.load_state_dict(state.optimizer)
    restore_rng(state.rng)


def round_row(round: int, per_client: list[dict], sampled: list[int], faults: list) -> dict:
    """The results row of 0-based ``round``: the means over clients, who was sampled, the
    faults since the last row and the per-client metrics; logged as it is made."""
    row = {"round": round + 1, **summarize(per_client), "sampled": sampled}
    if faults:
        row["faults"] = faults
    log.info(
        "round %d: local %s base %s novel %s hm %s",
        round + 1,
        row["local"],
        row["base"],
        row["novel"],
        row["hm"],
    )
    return {**row, "clients": per_client}


def run_simulation(
    experiment: Experiment,
    on_round: RoundCallback | None = None,
    resume_from: RunState | None = None,
    save: SaveCallback | None = None,
) -> dict:
    """Run every round in this process, from the start or from ``resume_from``. Returns the
    per-round rows (with per-client metrics and faults), the final per-client metrics and the
    final GLOBAL tensors. ``save`` receives the state before the first round and after every
    ``checkpoint_every`` rounds and the last one. A client fault leaves that client out of the
    round; fewer than ``min_clients`` usable updates raise RoundFailedError."""
    cfg = experiment.cfg
    server = Server(experiment.method, experiment.initial_global(), cfg.num_clients, cfg.seed)
    clients = build_clients(experiment)
    rows: list[dict] = []
    # Faults of rounds that are not evaluated wait for the next evaluated round's row.
    pending: list[dict] = []
    start = 0
    if resume_from is not None:
        restore_state(resume_from, server, clients, experiment.backbone.device)
        start = resume_from.round
        rows, pending = list(resume_from.rows), list(resume_from.pending_faults)
    elif save is not None:
        save(capture_state(0, server, clients, rows, pending))
    for round in tqdm(range(start, cfg.rounds), desc="rounds", disable=None):
        sampled = server.sample(round)
        replies = [
            train_or_fault(clients[cid], server.global_tensors, round, cfg.client_timeout)
            for cid in tqdm(sampled, desc=f"round {round + 1}", leave=False, disable=None)
        ]
        accepted, faults = screen_replies(server, round, replies, cfg.min_clients)
        server.aggregate(accepted)
        pending.extend(fault.to_dict() for fault in faults)
        last = round == cfg.rounds - 1
        if last or (round + 1) % cfg.eval_every == 0:
            params = {c.id: c.params(server.global_tensors) for c in clients}
            per_client = evaluate_clients(
                experiment, experiment.method, params, experiment.client_data
            )
            rows.append(round_row(round, per_client, sampled, pending))
            pending = []
            if on_round is not None:
                on_round(rows[-1])
        if save is not None and (last or (round + 1) % cfg.checkpoint_every == 0):
            save(capture_state(round + 1, server, clients, rows, pending))
    return {"rounds": rows, "global": server.global_tensors}
