"""The ClientApp: one SuperNode serves one partition (its node config's ``partition-id``).

``query`` answers with the partition (no torch imported: a SuperNode starts a process per
message); ``train`` and ``evaluate`` hand the message to :class:`~.node.Node`. ``flwr run``
loads ``app``; ``make_client_app(cfg, all_clients=True)`` binds a config directly and lets a
simulation actor keep every partition's data in one experiment.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ...config import RunConfig
from .settings import CLIENT_RECORD, NUM_PARTITIONS, PARTITION_ID, node_settings


def _log_to_stderr() -> None:
    """A SuperNode's ClientApp process has no logging set up: send fedpgp's lines (a restored
    personal state, the experiment built) to stderr, which the SuperNode's output shows."""
    logger = logging.getLogger("fedpgp")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def make_client_app(cfg: RunConfig | None = None, all_clients: bool = False) -> ClientApp:
    """A ClientApp for ``cfg`` (None: from the run config, in a SuperNode's process).
    ``all_clients`` builds every partition's data once per process, for simulation actors that
    serve many partitions."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        node = node_settings(context.node_config)
        record = ConfigRecord(
            {PARTITION_ID: node.partition_id, NUM_PARTITIONS: node.num_partitions}
        )
        return Message(RecordDict({CLIENT_RECORD: record}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        from .node import node_for

        if cfg is None:
            _log_to_stderr()
        return node_for(context, cfg, all_clients).train(message, context)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        from .node import node_for

        if cfg is None:
            _log_to_stderr()
        return node_for(context, cfg, all_clients).evaluate(message, context)

    return app


app = make_client_app()
