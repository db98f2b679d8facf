"""The ServerApp's rounds over a Flower Grid: the same sampling, screening and n_i-weighted
aggregation of GLOBAL tensors as the in-process runtime (Server and screen_replies, unchanged),
with partitions mapped to SuperNodes.

Every reply is read defensively: an error reply, a missing reply, a reply for another
partition or round, or an update that fails Server.check (tensor names, shapes, dtypes, finite
values, n_i > 0) becomes a Fault, logged with the node id, and is never averaged in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from ...config import RunConfig
from ...errors import FedPGPError
from ...evaluation import summarize
from ..faults import Fault, screen_replies
from ..server import Server
from ..simulation import round_row
from ..update import Update
from .records import (
    BadReplyError,
    MessageLog,
    describe,
    read_evaluation,
    read_update,
    tensors_to_record,
)
from .settings import (
    CLIENT_RECORD,
    CONFIG_RECORD,
    EVALUATE,
    GLOBAL_RECORD,
    NUM_PARTITIONS,
    PARTITION_ID,
    QUERY,
    TRAIN,
)

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0


def exchange(
    grid: Grid, messages: list[Message], timeout: float | None, message_log: MessageLog
) -> dict[int, Message]:
    """Send ``messages`` (at most one per node) and wait, up to ``timeout`` seconds (None:
    until every reply or error is in); returns the replies by the node each was sent to. Both
    directions go to ``message_log``."""
    if not messages:
        return {}
    message_log.record("sent", messages)
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    message_log.record("received", replies)
    # The grid gives each message its id when sending; a reply names the message it answers,
    # also when the SuperLink itself writes it (an error for a node that went away).
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    answered: dict[int, Message] = {}
    for reply in replies:
        node = node_of.get(reply.metadata.reply_to_message_id)
        if node is None:
            log.warning("dropped a reply to no message sent: %s", describe(reply))
            continue
        answered[node] = reply
    return answered


class NodeRegistry:
    """Which SuperNode serves which partition. A node is asked once (a query message) for its
    node config's partition-id; a restarted SuperNode comes back with a new node id, answers
    the query, and takes its partition over."""

    def __init__(
        self, grid: Grid, num_partitions: int, message_log: MessageLog, query_timeout: float
    ) -> None:
        self.grid = grid
        self.num_partitions = num_partitions
        self.message_log = message_log
        self.query_timeout = query_timeout
        self.node_of: dict[int, int] = {}
        self.partition_of: dict[int, int | None] = {}

    def refresh(self) -> None:
        """Forget nodes that left; ask new ones for their partition."""
        online = set(self.grid.get_node_ids())
        for node_id in [n for n in self.partition_of if n not in online]:
            partition = self.partition_of.pop(node_id)
            if partition is not None and self.node_of.get(partition) == node_id:
                del self.node_of[partition]
        new = sorted(online - set(self.partition_of))
        messages = [
            Message(RecordDict(), dst_node_id=node_id, message_type=QUERY) for node_id in new
        ]
        replies = exchange(self.grid, messages, self.query_timeout, self.message_log)
        for node_id, reply in replies.items():
            partition = self._partition(node_id, reply)
            self.partition_of[node_id] = partition
            if partition is None:
                continue
            previous = self.node_of.get(partition)
            if previous is not None and previous != node_id:
                log.warning(
                    "partition %d is now served by node %d (was node %d)",
                    partition,
                    node_id,
                    previous,
                )
            self.node_of[partition] = node_id

    def _partition(self, node_id: int, reply: Message) -> int | None:
        """The partition a query reply names, or None (logged) for a node that cannot serve."""
        if reply.has_error():
            log.warning(
                "node %d: partition query failed, node ignored: %s", node_id, reply.error.reason
            )
            return None
        record = reply.content.get(CLIENT_RECORD)
        partition = record.get(PARTITION_ID) if isinstance(record, ConfigRecord) else None
        count = record.get(NUM_PARTITIONS) if isinstance(record, ConfigRecord) else None
        if (
            count != self.num_partitions
            or not isinstance(partition, int)
            or not (0 <= partition < self.num_partitions)
        ):
            log.warning(
                "node %d: node config has %s=%r %s=%r, the run needs %s in 0..%d of %d; "
                "node ignored",
                node_id,
                PARTITION_ID,
                partition,
                NUM_PARTITIONS,
                count,
                PARTITION_ID,
                self.num_partitions - 1,
                self.num_partitions,
            )
            return None
        return partition

    def wait_for_all(self, seconds: float) -> None:
        """Block until every partition is served; FedPGPError after ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            self.refresh()
            missing = sorted(set(range(self.num_partitions)) - set(self.node_of))
            if not missing:
                log.info("nodes by partition: %s", self.node_of)
                return
            if time.monotonic() > deadline:
                raise FedPGPError(
                    f"after {seconds:.0f} s no SuperNode serves partitions {missing}: start one "
                    f'per partition with --node-config "{PARTITION_ID}=<i> '
                    f'{NUM_PARTITIONS}={self.num_partitions}"'
                )
            time.sleep(POLL_SECONDS)


class FlowerRounds:
    """The rounds of one run, driven over ``grid``: train the sampled partitions, screen and
    aggregate their updates, evaluate every partition at evaluation rounds."""

    def __init__(
        self,
        cfg: RunConfig,
        server: Server,
        grid: Grid,
        registry: NodeRegistry,
        message_log: MessageLog,
    ) -> None:
        self.cfg = cfg
        self.server = server
        self.grid = grid
        self.registry = registry
        self.message_log = message_log
        self.round_globals: dict[int, dict[str, Tensor]] = {}

    def _content(self, round: int, zeroshot: bool = False) -> RecordDict:
        return RecordDict(
            {
                GLOBAL_RECORD: tensors_to_record(self.server.global_tensors),
                CONFIG_RECORD: ConfigRecord({"round": round, "zeroshot": zeroshot}),
            }
        )

    def _send(
        self,
        kind: str,
        round: int,
        partitions: list[int],
        timeout: float | None,
        zeroshot: bool = False,
    ) -> tuple[dict[int, tuple[int, Message | None]], list[int]]:
        """Send one message of ``kind`` per served partition; returns, by partition, the node
        and its reply (None: no reply in time), and the partitions no node serves."""
        content = self._content(round, zeroshot)
        targets = {p: self.registry.node_of[p] for p in partitions if p in self.registry.node_of}
        messages = [
            Message(content, dst_node_id=node, message_type=kind, group_id=str(round + 1))
            for node in targets.values()
        ]
        replies = exchange(self.grid, messages, timeout, self.message_log)
        served = {p: (node, replies.get(node)) for p, node in targets.items()}
        return served, [p for p in partitions if p not in targets]

    def train(self, round: int, sampled: list[int]) -> list[Update | Fault]:
        """Every sampled partition's Update, or the Fault that stands in for it, in sample
        order (the order of aggregation in process)."""
        timeout = self.cfg.client_timeout
        served, unserved = self._send(TRAIN, round, sampled, timeout)
        outcome: dict[int, Update | Fault] = {
            p: Fault(p, round + 1, "no SuperNode serves this partition") for p in unserved
        }
        for partition, (node, reply) in served.items():
            outcome[partition] = self._read_train(round, partition, node, reply, timeout)
        return [outcome[p] for p in sampled]

    def _read_train(
        self,
        round: int,
        partition: int,
        node: int,
        reply: Message | None,
        timeout: float | None,
    ) -> Update | Fault:
        if reply is None:
            log.warning(
                "round %d: node %d (partition %d) did not reply in time", round + 1, node, partition
            )
            return Fault(partition, round + 1, f"no reply within client_timeout ({timeout} s)")
        if reply.has_error():
            log.warning(
                "round %d: node %d (partition %d) failed: %s",
                round + 1,
                node,
                partition,
                reply.error.reason,
            )
            return Fault(partition, round + 1, f"failed: {reply.error.reason}")
        try:
            update = read_update(reply, partition, round)
        except BadReplyError as exc:
            log.warning(
                "round %d: rejected reply of node %d (partition %d): %s",
                round + 1,
                node,
                partition,
                exc,
            )
            return Fault(partition, round + 1, f"unusable update: {exc}")
        reason = self.server.check(update)
        if reason is not None:
            # screen_replies turns it into a Fault; the node id is known only here.
            log.warning(
                "round %d: rejected update of node %d (partition %d): %s",
                round + 1,
                node,
                partition,
                reason,
            )
        return update

    def evaluate(self, round: int, zeroshot: bool) -> tuple[list[dict], list[dict]]:
        """Per-client rows of every partition (and their zero-shot rows when asked), each
        computed on the node that holds the client's data and PERSONAL state."""
        partitions = list(range(self.cfg.num_clients))
        served, unserved = self._send(
            EVALUATE, round, partitions, self.cfg.client_timeout, zeroshot
        )
        for partition in unserved:
            log.warning(
                "round %d: partition %d not evaluated: no SuperNode serves it", round + 1, partition
            )
        rows, zeroshot_rows = [], []
        for partition, (node, reply) in sorted(served.items()):
            if reply is None or reply.has_error():
                why = "no reply in time" if reply is None else reply.error.reason
                log.warning(
                    "round %d: node %d (partition %d) not evaluated: %s",
                    round + 1,
                    node,
                    partition,
                    why,
                )
                continue
            try:
                row, zrow = read_evaluation(reply, partition, round, zeroshot)
            except BadReplyError as exc:
                log.warning(
                    "round %d: rejected evaluation of node %d (partition %d): %s",
                    round + 1,
                    node,
                    partition,
                    exc,
                )
                continue
            rows.append(row)
            if zrow is not None:
                zeroshot_rows.append(zrow)
        return rows, zeroshot_rows

    def run(self) -> dict[str, Any]:
        """Every round; returns the rows (as run_simulation's), the final GLOBAL tensors, the
        GLOBAL tensors each round started from, and CLIP zero-shot's summary."""
        cfg = self.cfg
        rows: list[dict] = []
        pending: list[dict] = []
        zeroshot: Mapping[str, Any] = summarize([])
        for round in range(cfg.rounds):
            self.registry.refresh()
            sampled = self.server.sample(round)
            self.round_globals[round] = dict(self.server.global_tensors)
            replies = self.train(round, sampled)
            accepted, faults = screen_replies(self.server, round, replies, cfg.min_clients)
            self.server.aggregate(accepted)
            pending.extend(fault.to_dict() for fault in faults)
            last = round == cfg.rounds - 1
            if last or (round + 1) % cfg.eval_every == 0:
                self.registry.refresh()
                per_client, zeroshot_rows = self.evaluate(round, zeroshot=last)
                rows.append(round_row(round, per_client, sampled, pending))
                pending = []
                if last:
                    zeroshot = summarize(zeroshot_rows)
        return {
            "rounds": rows,
            "global": self.server.global_tensors,
            "round_globals": self.round_globals,
            "zeroshot": zeroshot,
        }
