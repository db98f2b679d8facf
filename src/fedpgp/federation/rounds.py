"""The round loop of both runtimes: sample -> send -> train -> screen -> aggregate -> evaluate
-> results row -> checkpoint. The server policy (fedpgp.federation.server) decides; a Transport
carries what it decides to the clients and back: in-process calls (fedpgp.federation.inprocess)
or Flower messages over a Grid (fedpgp.federation.flower.strategy).

The run state goes to ``save`` before the first round and after every ``checkpoint_every``
rounds and the last one; a run started again from such a state gives the same rows, bit for
bit, as one that never stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from tqdm import tqdm

from ..checkpoint import FOLDER, RunState
from ..config import RunConfig
from ..console import PROGRESS
from ..evaluation import summarize
from ..methods.base import Tensors
from ..report import build_results
from ..rundir import RunDir
from ..seeding import capture_rng, restore_rng
from .faults import Fault, RoundFailedError
from .server import Server
from .update import Update

log = logging.getLogger(__name__)

SaveCallback = Callable[[RunState], None]


class Transport(Protocol):
    """How the server reaches its clients."""

    def train(self, round: int, sends: dict[int, Tensors]) -> list[Update | Fault]:
        """Every sampled client's reply to 0-based ``round`` (``sends``: client -> what it
        receives), in the order of ``sends``."""

    def evaluate(
        self, round: int, global_tensors: Tensors, zeroshot: bool
    ) -> tuple[list[dict], list[dict]]:
        """Every client's row {id, n_train, local, base, novel} after ``round``, and with
        ``zeroshot`` CLIP zero-shot's rows of the same clients."""

    def capture(self, state: RunState) -> RunState:
        """``state`` with what the transport holds of the clients (their PERSONAL state in
        process; the rounds of the nodes' state files over Flower)."""

    def restore(self, state: RunState) -> None:
        """Put the clients back where ``state`` was."""


def tensor_bytes(tensors: Tensors) -> int:
    """The payload of ``tensors``: their elements times element size, whatever the transport
    adds around them."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def round_row(
    round: int,
    rounds: int,
    per_client: list[dict],
    sampled: list[int],
    faults: list,
    traffic: dict[str, int],
) -> dict:
    """The results row of 0-based ``round`` of ``rounds``: the means over clients, who was
    sampled, the tensor bytes of that round each way (``down`` to the clients, ``up`` from
    them), the faults since the last row and the per-client metrics; logged (a progress line)
    as it is made."""
    row = {"round": round + 1, **summarize(per_client), "sampled": sampled, "bytes": traffic}
    if faults:
        row["faults"] = faults
    log.info(
        "round %d/%d: local %s base %s novel %s hm %s",
        round + 1,
        rounds,
        *(_percent(row[key]) for key in ("local", "base", "novel", "hm")),
        extra=PROGRESS,
    )
    return {**row, "clients": per_client}


def run_rounds(
    cfg: RunConfig,
    server: Server,
    transport: Transport,
    start: RunState | None,
    save: SaveCallback,
) -> tuple[list[dict], dict[str, Any]]:
    """Every round from the start or from ``start``; returns the result rows and CLIP
    zero-shot's summary (measured with the last evaluation). A client fault leaves that client
    out of the round; fewer than ``min_clients`` usable updates raise RoundFailedError."""
    rows: list[dict] = []
    # Faults of rounds that are not evaluated wait for the next evaluated round's row.
    pending: list[dict] = []
    zeroshot: dict[str, Any] | None = None
    first = 0
    every = cfg.eval_every if cfg.eval_every is not None else server.method.eval_every

    def state(round: int) -> RunState:
        return transport.capture(
            RunState(
                round=round,
                global_tensors=dict(server.global_tensors),
                stored={cid: dict(up) for cid, up in server.stored.items()},
                rows=list(rows),
                pending_faults=list(pending),
                zeroshot=zeroshot,
                rng=capture_rng(),
            )
        )

    if start is None:
        save(state(0))
    else:
        server.restore(start)
        transport.restore(start)
        restore_rng(start.rng)
        first, rows, pending = start.round, list(start.rows), list(start.pending_faults)
        zeroshot = start.zeroshot
    for round in tqdm(range(first, cfg.rounds), desc="rounds", disable=None):
        sampled = server.sample(round)
        sends = {cid: server.sends(cid, round) for cid in sampled}
        replies = transport.train(round, sends)
        accepted, faults = server.screen(round, replies, cfg.min_clients)
        traffic = {
            "down": sum(tensor_bytes(s) for s in sends.values()),
            "up": sum(tensor_bytes(u.tensors) for u in accepted),
        }
        server.aggregate(accepted)
        pending.extend(fault.to_dict() for fault in faults)
        last = round == cfg.rounds - 1
        if last or (every is not None and (round + 1) % every == 0):
            per_client, zero_rows = transport.evaluate(round, server.global_tensors, last)
            rows.append(round_row(round, cfg.rounds, per_client, sampled, pending, traffic))
            pending = []
            if last:
                zeroshot = summarize(zero_rows)
        if last or (round + 1) % cfg.checkpoint_every == 0:
            save(state(round + 1))
    if zeroshot is None:
        # A checkpoint of the last round written before zero-shot was kept in checkpoints.
        _, zero_rows = transport.evaluate(cfg.rounds - 1, server.global_tensors, True)
        zeroshot = summarize(zero_rows)
    return rows, zeroshot


def run_federation(
    run_dir: RunDir,
    cfg: RunConfig,
    server: Server,
    transport: Transport,
    partition_digest: str,
    start: RunState | None,
    resume_hint: str,
) -> dict[str, Any]:
    """The rounds, checkpointed into ``run_dir``, and the results files; returns results.json's
    content. ``resume_hint`` tells the user how to continue after a failed round."""

    def save(state: RunState) -> None:
        run_dir.save_checkpoint(state, cfg, partition_digest)

    try:
        rows, zeroshot = run_rounds(cfg, server, transport, start, save)
    except RoundFailedError as exc:
        raise RoundFailedError(
            f"{exc}. The last checkpoint is in {run_dir.path / FOLDER}; once the clients "
            f"are back, continue with {resume_hint}"
        ) from exc
    results = build_results(cfg.to_dict(), rows, zeroshot)
    run_dir.write_results(results, rows, server.global_tensors)
    return results
