"""The Flower transport of the round loop (fedpgp.federation.rounds): partitions mapped to
SuperNodes, and what the server decides carried to them as Messages over a Grid.

Every reply is read defensively: an error reply, a missing reply, a reply for another
partition or round, or an update that fails Server.check (tensor names, shapes, dtypes, finite
values, n_i) becomes a Fault, logged with the node id, and is never combined. A node that
cannot start from the personal state the server expects stops the run (StateError naming the
node and both rounds): states are never mixed.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ...checkpoint import RunState
from ...config import RunConfig
from ...data.partition import PartitionManifest
from ...errors import FedPGPError
from ...methods.base import Tensors
from ..faults import Fault, timeout_reason
from ..server import Server
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
    KEPT_ROUND,
    MANIFEST,
    MANIFEST_DIGEST,
    NUM_PARTITIONS,
    PARTITION_DIGEST,
    PARTITION_ID,
    QUERY,
    QUERY_MANIFEST,
    RUN_DIGEST,
    RUN_ID,
    STATE_ERROR_RECORD,
    STATE_ROUND,
    TRAIN,
)
from .state import StateError

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


class FlowerTransport:
    """The rounds' Transport over ``grid``: one message per sampled partition to train, one per
    partition to evaluate, each naming the run, its digests and the personal state the node must
    start from. ``node_rounds`` (partition -> the round of the state it holds) follows every
    readable train reply; ``kept_rounds`` are those of the last checkpoint."""

    def __init__(
        self,
        cfg: RunConfig,
        server: Server,
        run_id: str,
        run_digest: str,
        partition_digest: str,
        grid: Grid,
        registry: NodeRegistry,
        message_log: MessageLog,
    ) -> None:
        self.cfg = cfg
        self.server = server
        self.run_id = run_id
        self.run_digest = run_digest
        self.partition_digest = partition_digest
        self.grid = grid
        self.registry = registry
        self.message_log = message_log
        self.node_rounds = {p: 0 for p in range(cfg.num_clients)}
        self.kept_rounds = dict(self.node_rounds)

    def _content(self, round: int, partition: int, tensors: Tensors, zeroshot: bool) -> RecordDict:
        config = {
            "round": round,
            RUN_ID: self.run_id,
            RUN_DIGEST: self.run_digest,
            PARTITION_DIGEST: self.partition_digest,
            STATE_ROUND: self.node_rounds[partition],
            KEPT_ROUND: self.kept_rounds[partition],
            "zeroshot": zeroshot,
        }
        return RecordDict(
            {GLOBAL_RECORD: tensors_to_record(tensors), CONFIG_RECORD: ConfigRecord(config)}
        )

    def _send(
        self, kind: str, round: int, sends: dict[int, Tensors], zeroshot: bool = False
    ) -> tuple[dict[int, tuple[int, Message | None]], list[int]]:
        """One message of ``kind`` per served partition of ``sends``; returns, by partition, the
        node and its reply (None: no reply in time), and the partitions no node serves. A
        state-error reply raises StateError naming the node."""
        self.registry.refresh()
        targets = {p: self.registry.node_of[p] for p in sends if p in self.registry.node_of}
        messages = [
            Message(
                self._content(round, p, sends[p], zeroshot),
                dst_node_id=node,
                message_type=kind,
                group_id=str(round + 1),
            )
            for p, node in targets.items()
        ]
        replies = exchange(self.grid, messages, self.cfg.client_timeout, self.message_log)
        served = {p: (node, replies.get(node)) for p, node in targets.items()}
        for partition, (node, reply) in served.items():
            if reply is not None and not reply.has_error():
                record = reply.content.get(STATE_ERROR_RECORD)
                if isinstance(record, ConfigRecord):
                    raise StateError(
                        f"node {node} (partition {partition}), round {round + 1}: "
                        f"{record.get('reason')}"
                    )
        return served, [p for p in sends if p not in targets]

    def train(self, round: int, sends: dict[int, Tensors]) -> list[Update | Fault]:
        served, unserved = self._send(TRAIN, round, sends)
        outcome: dict[int, Update | Fault] = {
            p: Fault(p, round + 1, "no SuperNode serves this partition") for p in unserved
        }
        for partition, (node, reply) in served.items():
            outcome[partition] = self._read_train(round, partition, node, reply)
        return [outcome[p] for p in sends]

    def _read_train(
        self, round: int, partition: int, node: int, reply: Message | None
    ) -> Update | Fault:
        where = f"round {round + 1}: node {node} (partition {partition})"
        if reply is None:
            log.warning("%s did not reply in time", where)
            return Fault(partition, round + 1, timeout_reason(self.cfg.client_timeout))
        if reply.has_error():
            log.warning("%s failed: %s", where, reply.error.reason)
            return Fault(partition, round + 1, f"failed: {reply.error.reason}")
        expected = {k: self.server.global_tensors[k] for k in self.server.method.upload_keys}
        try:
            update = read_update(reply, partition, round, expected)
            state_round = reply.content[CLIENT_RECORD].get(STATE_ROUND)
            if state_round != round + 1:
                raise BadReplyError(f"kept the state of round {state_round!r}, not {round + 1}")
        except BadReplyError as exc:
            log.warning("%s: rejected reply: %s", where, exc)
            return Fault(partition, round + 1, f"unusable update: {exc}")
        # The node trained and kept its new state, whatever the server makes of the update.
        self.node_rounds[partition] = round + 1
        reason = self.server.check(update)
        if reason is not None:
            # Server.screen turns it into a Fault; the node id is known only here.
            log.warning("%s: rejected update: %s", where, reason)
        return update

    def evaluate(
        self, round: int, global_tensors: Tensors, zeroshot: bool
    ) -> tuple[list[dict], list[dict]]:
        """Per-client rows of every partition (and their zero-shot rows when asked), each
        computed on the node that holds the client's data and PERSONAL state."""
        partitions = range(self.cfg.num_clients)
        served, unserved = self._send(
            EVALUATE, round, {p: global_tensors for p in partitions}, zeroshot
        )
        for partition in unserved:
            log.warning("round %d: partition %d not evaluated: no SuperNode", round + 1, partition)
        rows, zeroshot_rows = [], []
        for partition, (node, reply) in sorted(served.items()):
            where = f"round {round + 1}: node {node} (partition {partition})"
            if reply is None or reply.has_error():
                why = "no reply in time" if reply is None else reply.error.reason
                log.warning("%s not evaluated: %s", where, why)
                continue
            try:
                row, zrow = read_evaluation(reply, partition, round, zeroshot)
            except BadReplyError as exc:
                log.warning("%s: rejected evaluation: %s", where, exc)
                continue
            rows.append(row)
            if zrow is not None:
                zeroshot_rows.append(zrow)
        return rows, zeroshot_rows

    def capture(self, state: RunState) -> RunState:
        state.node_rounds = dict(self.node_rounds)
        # Nodes may forget states older than those of the checkpoint about to be written.
        self.kept_rounds = dict(self.node_rounds)
        return state

    def restore(self, state: RunState) -> None:
        self.node_rounds = {p: state.node_rounds.get(p, 0) for p in range(self.cfg.num_clients)}
        self.kept_rounds = dict(self.node_rounds)


def fetch_manifest(
    grid: Grid, registry: NodeRegistry, message_log: MessageLog, timeout: float
) -> PartitionManifest:
    """The partition manifest computed by partition 0's node (the server holds no data); every
    node's is checked against it with each message."""
    node = registry.node_of[0]
    message = Message(RecordDict(), dst_node_id=node, message_type=QUERY_MANIFEST)
    reply = exchange(grid, [message], timeout, message_log).get(node)
    if reply is None or reply.has_error():
        why = "no reply in time" if reply is None else reply.error.reason
        raise FedPGPError(f"node {node} (partition 0): partition manifest query failed: {why}")
    record = reply.content.get(CLIENT_RECORD)
    text = record.get(MANIFEST) if isinstance(record, ConfigRecord) else None
    if not isinstance(text, str):
        raise FedPGPError(f"node {node} (partition 0): its reply holds no partition manifest")
    manifest = PartitionManifest.from_json(text, f"node {node} (partition 0)")
    if manifest.digest() != record.get(MANIFEST_DIGEST):
        raise FedPGPError(f"node {node} (partition 0): partition manifest and digest disagree")
    return manifest
