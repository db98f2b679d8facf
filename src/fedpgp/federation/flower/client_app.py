"""The ClientApp: one SuperNode serves one partition (its node config's ``partition-id``).

``query`` answers with the partition (no torch imported: a SuperNode starts a process per
message); ``query.manifest`` with the partition manifest the node computes; ``train`` and
``evaluate`` hand the message to :class:`~.node.Node`. ``flwr run`` loads ``app``;
``make_client_app(cfg, all_clients=True, state_dir=...)`` binds a config directly, lets a
simulation actor keep every partition's data in one experiment, and gives the virtual nodes a
state dir.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ...config import RunConfig
from .settings import (
    CLIENT_RECORD,
    MANIFEST_ACTION,
    NUM_PARTITIONS,
    PARTITION_ID,
    node_settings,
)


def _log_to_stderr() -> None:
    """A SuperNode's ClientApp process has no logging set up: send fedpgp's lines (a restored
    personal state, the experiment built) to stderr, which the SuperNode's output shows."""
    logger = logging.getLogger("fedpgp")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def make_client_app(
    cfg: RunConfig | None = None, all_clients: bool = False, state_dir: Path | None = None
) -> ClientApp:
    """A ClientApp for ``cfg`` (None: from the run config, in a SuperNode's process).
    ``all_clients`` builds every partition's data once per process, for simulation actors that
    serve many partitions; ``state_dir`` is where nodes without a ``state-dir`` in their node
    config keep their personal state."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        node = node_settings(context.node_config)
        record = ConfigRecord(
            {PARTITION_ID: node.partition_id, NUM_PARTITIONS: node.num_partitions}
        )
        return Message(RecordDict({CLIENT_RECORD: record}), reply_to=message)

    @app.query(MANIFEST_ACTION)
    def manifest(message: Message, context: Context) -> Message:
        from .node import manifest_reply

        return manifest_reply(message, context, cfg)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        from .node import node_for

        if cfg is None:
            _log_to_stderr()
        return node_for(context, cfg, all_clients, state_dir).train(message, context)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        from .node import node_for

        if cfg is None:
            _log_to_stderr()
        return node_for(context, cfg, all_clients, state_dir).evaluate(message, context)

    return app


app = make_client_app()
