"""Tensors and metrics in Flower records, and the server's reading of a reply.

A train reply holds three records: ``global`` (an ArrayRecord with the method's GLOBAL tensors
and nothing else), ``metrics`` (``num-examples`` = n_i and the local loss) and ``client``
(``partition-id`` and ``round``). An evaluate reply holds ``client`` and ``metrics`` (Local,
Base, Novel and ``n-train``), plus ``zeroshot`` when CLIP zero-shot was asked for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import Tensor

from ...evaluation import METRICS
from ..update import Update
from .settings import CLIENT_RECORD, GLOBAL_RECORD, METRICS_RECORD, ZEROSHOT_RECORD

NUM_EXAMPLES = "num-examples"
N_TRAIN = "n-train"


class BadReplyError(ValueError):
    """A reply that must not be used; the message says why."""


def tensors_to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """An ArrayRecord holding a CPU copy of each tensor, under its own name."""
    return ArrayRecord(
        {name: Array(value.detach().cpu().contiguous().numpy()) for name, value in tensors.items()}
    )


def record_to_tensors(record: Any, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The tensors of an ArrayRecord; BadReplyError if it is not one or an array cannot be read."""
    if not isinstance(record, ArrayRecord):
        raise BadReplyError(f"expected an ArrayRecord, got {type(record).__name__}")
    tensors = {}
    for name, array in record.items():
        try:
            values = np.array(array.numpy(), copy=True)
            tensors[name] = torch.from_numpy(values).to(device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise BadReplyError(f"array {name!r} cannot be read: {exc}") from exc
    return tensors


def metrics_record(row: Mapping[str, float | None], n_train: int) -> MetricRecord:
    """Local / Base / Novel of one client (an absent metric, e.g. no novel classes, is left
    out) and its number of training samples."""
    values: dict[str, int | float] = {N_TRAIN: n_train}
    values.update({m: float(row[m]) for m in METRICS if row.get(m) is not None})
    return MetricRecord(values)


def read_metrics(record: Any) -> dict[str, float | None]:
    """Local / Base / Novel from a metrics record (None where absent); BadReplyError if the
    record is malformed."""
    if not isinstance(record, MetricRecord):
        raise BadReplyError(f"expected a MetricRecord, got {type(record).__name__}")
    row: dict[str, float | None] = {}
    for metric in METRICS:
        value = record.get(metric)
        if value is not None and (not isinstance(value, (int, float)) or not 0 <= value <= 100):
            raise BadReplyError(f"metric {metric!r} must be a percentage, got {value!r}")
        row[metric] = None if value is None else float(value)
    return row


def client_record(partition_id: int, round: int) -> ConfigRecord:
    """Who answers, and for which round."""
    return ConfigRecord({"partition-id": partition_id, "round": round})


def check_sender(content: RecordDict, partition_id: int, round: int) -> None:
    """BadReplyError unless the reply says it comes from ``partition_id`` for ``round``."""
    record = content.get(CLIENT_RECORD)
    if not isinstance(record, ConfigRecord):
        raise BadReplyError(f"no '{CLIENT_RECORD}' record naming the partition")
    if record.get("partition-id") != partition_id or record.get("round") != round:
        raise BadReplyError(
            f"answers for partition {record.get('partition-id')!r} round {record.get('round')!r}, "
            f"expected partition {partition_id} round {round}"
        )


# An npy header is at most a few hundred bytes; anything past it and the values is not an array.
_HEADER_ALLOWANCE = 4096


def read_expected(record: Any, expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of an ArrayRecord that must hold exactly ``expected``'s names, shapes and
    dtypes; every array's declared shape, dtype and size is checked before any is decoded, so
    a hostile reply cannot make the server copy a huge array. BadReplyError says what differs."""
    if not isinstance(record, ArrayRecord):
        raise BadReplyError(f"expected an ArrayRecord, got {type(record).__name__}")
    if set(record) != set(expected):
        raise BadReplyError(f"arrays {sorted(record)}, expected {sorted(expected)}")
    for name, array in record.items():
        reference = expected[name]
        dtype = str(reference.dtype).removeprefix("torch.")
        shape = tuple(reference.shape)
        if array.dtype != dtype or tuple(array.shape) != shape:
            raise BadReplyError(
                f"array {name!r} is {array.dtype} {tuple(array.shape)}, expected {dtype} {shape}"
            )
        if len(array.data) > reference.numel() * reference.element_size() + _HEADER_ALLOWANCE:
            raise BadReplyError(f"array {name!r} holds {len(array.data)} bytes, more than {shape}")
    tensors = record_to_tensors(record)
    for name, value in tensors.items():
        if value.dtype != expected[name].dtype or value.shape != expected[name].shape:
            raise BadReplyError(f"array {name!r} decodes to another shape or dtype than declared")
    return tensors


def read_update(
    reply: Message, partition_id: int, round: int, expected: Mapping[str, Tensor]
) -> Update:
    """The Update inside a train reply, its arrays those of ``expected`` (read_expected).
    BadReplyError when the reply cannot be used; n_i and finite values are then checked by
    Server.check."""
    content = reply.content
    check_sender(content, partition_id, round)
    tensors = read_expected(content.get(GLOBAL_RECORD), expected)
    metrics = content.get(METRICS_RECORD)
    if not isinstance(metrics, MetricRecord) or NUM_EXAMPLES not in metrics:
        raise BadReplyError(f"no '{METRICS_RECORD}' record with '{NUM_EXAMPLES}'")
    extra = {k: float(v) for k, v in metrics.items() if k != NUM_EXAMPLES and _is_number(v)}
    return Update(partition_id, round, tensors, metrics[NUM_EXAMPLES], extra)


def read_evaluation(
    reply: Message, partition_id: int, round: int, zeroshot: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The per-client row ({id, n_train, local, base, novel}) of an evaluate reply, and its
    zero-shot row when asked for."""
    content = reply.content
    check_sender(content, partition_id, round)
    metrics = content.get(METRICS_RECORD)
    row = read_metrics(metrics)
    n_train = metrics.get(N_TRAIN)
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 0:
        raise BadReplyError(f"'{N_TRAIN}' must be a count, got {n_train!r}")
    personal = {"id": partition_id, "n_train": n_train, **row}
    if not zeroshot:
        return personal, None
    return personal, {
        "id": partition_id,
        "n_train": n_train,
        **read_metrics(content.get(ZEROSHOT_RECORD)),
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def describe(message: Message) -> dict[str, Any]:
    """What a message carries, by name only (never values): record names and the keys of
    each record, or the error of an error reply."""
    meta = message.metadata
    entry: dict[str, Any] = {
        "type": meta.message_type,
        "round": meta.group_id,
        "src": meta.src_node_id,
        "dst": meta.dst_node_id,
    }
    if message.has_error():
        entry["error"] = message.error.reason
        return entry
    content = message.content
    entry["arrays"] = {name: sorted(rec) for name, rec in content.array_records.items()}
    entry["metrics"] = {name: sorted(rec) for name, rec in content.metric_records.items()}
    entry["configs"] = {name: sorted(rec) for name, rec in content.config_records.items()}
    return entry


class MessageLog:
    """Appends one JSON line per message the ServerApp sends or receives: what crossed the
    SuperLink, by record and array name, so a test or an auditor can check that only GLOBAL
    tensors ever left a node."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def record(self, direction: str, messages: list[Message]) -> None:
        if self.path is None or not messages:
            return
        with open(self.path, "a", encoding="utf-8") as stream:
            for message in messages:
                stream.write(json.dumps({"direction": direction, **describe(message)}) + "\n")
