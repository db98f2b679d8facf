"""The in-process transport: every client in this process, called in sample order; the
default runtime, deterministic."""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm import tqdm

from ..checkpoint import RunState
from ..config import batch_obstacle
from ..evaluation import evaluate_clients, zero_shot_rows
from ..experiment import Experiment
from ..methods.base import Tensors
from .batched import train_batched
from .client import Client, Optimizers
from .faults import ClientTimeoutError, Fault, timeout_reason
from .rounds import SaveCallback, run_rounds
from .server import Server
from .update import Update

log = logging.getLogger(__name__)


class InProcess:
    """Every client of ``experiment``, sharing one optimizer policy (and, with
    ``optimizer_state: shared``, one optimizer, as the authors' code does)."""

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment
        cfg, method = experiment.cfg, experiment.method
        device, width = experiment.backbone.device, experiment.backbone.text_width
        self.optimizers = Optimizers.from_config(cfg)
        self.clients = {
            cid: Client(
                cid,
                method,
                data,
                {k: v.to(device) for k, v in method.initial_personal(width, cid).items()},
                self.optimizers,
                cfg.seed,
            )
            for cid, data in sorted(experiment.client_data.items())
        }

    def _train_one(self, client: Client, received: Tensors, round: int) -> Update | Fault:
        """``client.train``; an exception, or passing ``client_timeout``, becomes a Fault (the
        client then keeps the PERSONAL tensors it had)."""
        timeout = self.experiment.cfg.client_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return client.train(received, round, deadline)
        except ClientTimeoutError as exc:
            log.warning("round %d: client %d timed out: %s", round + 1, client.id, exc)
            return Fault(client.id, round + 1, timeout_reason(timeout))
        # Whatever a client raises is that client's fault, not the run's.
        except Exception as exc:
            log.warning("round %d: client %d raised", round + 1, client.id, exc_info=True)
            return Fault(client.id, round + 1, f"raised {type(exc).__name__}: {exc}")

    @property
    def batches(self) -> bool:
        """Whether the clients of a round train in lockstep: ``batch_clients: on`` (validated
        to be possible), or ``auto`` on CUDA for a method that can. On the CPU a world step is
        bound by its matrix products, not by per-client overhead, and lockstep gains only 1.1
        to 1.3x (docs/speed.md) at float-order differences: auto keeps the exact sequential
        path there."""
        cfg = self.experiment.cfg
        if not self.experiment.method.trains or cfg.batch_clients == "off":
            return False
        if batch_obstacle(cfg) is not None:
            return False
        return cfg.batch_clients == "on" or self.experiment.backbone.device.type == "cuda"

    def train(self, round: int, sends: dict[int, Tensors]) -> list[Update | Fault]:
        if self.batches and len(sends) > 1:
            return self._train_batched(round, sends)
        return [
            self._train_one(self.clients[cid], received, round)
            for cid, received in tqdm(
                sends.items(), desc=f"round {round + 1}", leave=False, disable=None
            )
        ]

    def _train_batched(self, round: int, sends: dict[int, Tensors]) -> list[Update | Fault]:
        """The clients of each prompt bank (all of them, unless each trains over its own
        classes) in one lockstep computation; a group whose computation raises trains again one
        client at a time, so that each failing client is its own fault."""
        groups: dict[int, list[int]] = {}
        for cid in sends:
            groups.setdefault(id(self.clients[cid].data.bank), []).append(cid)
        replies: dict[int, Update | Fault] = {}
        for members in groups.values():
            if len(members) > 1:
                try:
                    clients = [self.clients[cid] for cid in members]
                    updates = train_batched(clients, [sends[c] for c in members], round)
                    replies.update(zip(members, updates, strict=True))
                    continue
                except Exception:
                    log.warning(
                        "round %d: batched training of clients %s raised; training them one by one",
                        round + 1,
                        members,
                        exc_info=True,
                    )
            for cid in members:
                replies[cid] = self._train_one(self.clients[cid], sends[cid], round)
        return [replies[cid] for cid in sends]

    def evaluate(
        self, round: int, global_tensors: Tensors, zeroshot: bool
    ) -> tuple[list[dict], list[dict]]:
        params = {cid: c.params(global_tensors) for cid, c in self.clients.items()}
        rows = evaluate_clients(self.experiment, params)
        return rows, zero_shot_rows(self.experiment, list(self.clients)) if zeroshot else []

    def capture(self, state: RunState) -> RunState:
        state.personal = {cid: dict(c.personal) for cid, c in self.clients.items()}
        state.optimizer = self.optimizers.buffers()
        return state

    def restore(self, state: RunState) -> None:
        """The clients' PERSONAL tensors and the shared optimizer of ``state``."""
        device = self.experiment.backbone.device
        for client in self.clients.values():
            saved = state.personal.get(client.id, {})  # methods without PERSONAL tensors save none
            client.personal = {k: saved[k].to(device) for k in client.personal}
        if state.optimizer:
            # The shared optimizer trains {GLOBAL, PERSONAL} of whichever client comes first.
            first = next(iter(self.clients.values()))
            global_tensors = {
                k: state.global_tensors[k].to(device) for k in self.experiment.method.global_keys
            }
            self.optimizers.load_buffers(first.params(global_tensors), state.optimizer)


def inprocess_server(experiment: Experiment) -> Server:
    """The server of an in-process run, starting from the run seed's GLOBAL tensors."""
    cfg, method, backbone = experiment.cfg, experiment.method, experiment.backbone
    initial = method.initial_global(backbone.text_width)
    return Server(
        method,
        {k: v.to(backbone.device) for k, v in initial.items()},
        cfg.num_clients,
        cfg.seed,
        experiment.manifest.sample_counts(),
    )


def run_inprocess(
    experiment: Experiment, start: RunState | None = None, save: SaveCallback | None = None
) -> tuple[list[dict], dict[str, Any], Server]:
    """Every round of ``experiment`` in this process (from ``start``, a checkpointed state, if
    given): the result rows, CLIP zero-shot's summary and the server at the end."""
    server = inprocess_server(experiment)
    transport = InProcess(experiment)
    rows, zeroshot = run_rounds(
        experiment.cfg, server, transport, start, save or (lambda state: None)
    )
    return rows, zeroshot, server
