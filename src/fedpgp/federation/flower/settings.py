"""What the Flower apps read from Flower's run config and node config.

Run config (``[tool.flwr.app.config]`` in pyproject.toml, overridden by ``flwr run
--run-config``): the fedpgp config comes from ``config-file`` (a YAML file, as ``fedpgp run
--config``) and ``set`` (space-separated ``key=value`` overrides with the same dotted keys as
``fedpgp run --set``). Node config (``flower-supernode --node-config``): ``partition-id``,
``num-partitions``, and optionally ``state-dir`` and ``data-root``.

This module imports no torch: every ClientApp process reads it, even for a query.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import RunConfig, config_from_dict, load_config
from ...errors import ConfigError

CONFIG_FILE = "config-file"
OVERRIDES = "set"
OUT_DIR = "out-dir"
NODE_WAIT = "node-wait"
RESUME = "resume"

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
STATE_DIR = "state-dir"
DATA_ROOT = "data-root"

# Message types and the names of the records inside messages.
TRAIN, EVALUATE, QUERY = "train", "evaluate", "query"
MANIFEST_ACTION = "manifest"
QUERY_MANIFEST = f"{QUERY}.{MANIFEST_ACTION}"
GLOBAL_RECORD = "global"
CONFIG_RECORD = "config"
CLIENT_RECORD = "client"
METRICS_RECORD = "metrics"
ZEROSHOT_RECORD = "zeroshot"
STATE_ERROR_RECORD = "state-error"
# Keys of the server's config record (and, for STATE_ROUND, of a train reply's client record).
RUN_ID = "run-id"
RUN_DIGEST = "run-digest"
PARTITION_DIGEST = "partition-digest"
STATE_ROUND = "state-round"
KEPT_ROUND = "kept-round"
MANIFEST = "manifest"
MANIFEST_DIGEST = "manifest-digest"


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The validated RunConfig named by the run config's ``config-file`` and ``set`` keys."""
    path = str(run_config.get(CONFIG_FILE, "") or "") or None
    raw = str(run_config.get(OVERRIDES, "") or "")
    try:
        overrides = shlex.split(raw)
    except ValueError as exc:
        raise ConfigError(f"run config '{OVERRIDES}': cannot split {raw!r}: {exc}") from exc
    return load_config(path, overrides)


@dataclass(frozen=True)
class ServerSettings:
    """Where the ServerApp writes its run directory, whether it continues the interrupted run
    there (``resume``), and how many seconds it waits for every partition to be served (before
    round 1, and for a new node's answer to the partition query). How long it waits for train
    replies is the fedpgp config's ``client_timeout``."""

    out_dir: Path
    node_wait: float = 300.0
    resume: bool = False


def server_settings(run_config: Mapping[str, Any], default_out: Path) -> ServerSettings:
    """ServerSettings from the run config; an empty ``out-dir`` means ``default_out``, which
    a resumed run cannot use."""
    out = str(run_config.get(OUT_DIR, "") or "")
    wait = run_config.get(NODE_WAIT, 300.0)
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait <= 0:
        raise ConfigError(f"run config '{NODE_WAIT}': expected seconds > 0, got {wait!r}")
    resume = run_config.get(RESUME, False)
    if isinstance(resume, str) and resume.lower() in ("true", "false", ""):
        resume = resume.lower() == "true"
    if not isinstance(resume, bool):
        raise ConfigError(f"run config '{RESUME}': expected true or false, got {resume!r}")
    if resume and not out:
        raise ConfigError(
            f"run config '{RESUME}': a resumed run needs '{OUT_DIR}', the run directory to continue"
        )
    return ServerSettings(
        out_dir=Path(out) if out else default_out, node_wait=float(wait), resume=resume
    )


@dataclass(frozen=True)
class NodeSettings:
    """One SuperNode's share of the federation: its partition (client id of the manifest), where
    its personal state lives on disk (None: only in ``context.state``), and an optional data root
    that replaces the run config's ``dataset.root`` on this machine."""

    partition_id: int
    num_partitions: int
    state_dir: Path | None = None
    data_root: str | None = None


def _node_int(node_config: Mapping[str, Any], key: str) -> int:
    if key not in node_config:
        raise ConfigError(
            f"node config '{key}' is missing: start the SuperNode with "
            f'--node-config "{PARTITION_ID}=0 {NUM_PARTITIONS}=2"'
        )
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"node config '{key}': expected an integer, got {value!r}")
    return value


def node_settings(node_config: Mapping[str, Any]) -> NodeSettings:
    """NodeSettings from a SuperNode's node config; ConfigError naming the bad key."""
    partition_id = _node_int(node_config, PARTITION_ID)
    num_partitions = _node_int(node_config, NUM_PARTITIONS)
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"node config '{PARTITION_ID}': expected 0 <= id < {num_partitions}, got {partition_id}"
        )
    state_dir = str(node_config.get(STATE_DIR, "") or "")
    data_root = str(node_config.get(DATA_ROOT, "") or "")
    return NodeSettings(
        partition_id, num_partitions, Path(state_dir) if state_dir else None, data_root or None
    )


def node_run_config(cfg: RunConfig, node: NodeSettings) -> RunConfig:
    """The run's config as this node sees it: ``num-partitions`` must be the run's
    ``num_clients``, and ``data-root`` (if set) replaces ``dataset.root``."""
    if node.num_partitions != cfg.num_clients:
        raise ConfigError(
            f"node config '{NUM_PARTITIONS}' is {node.num_partitions}, but the run has "
            f"num_clients {cfg.num_clients}"
        )
    if node.data_root is None:
        return cfg
    data = cfg.to_dict()
    data["dataset"]["root"] = node.data_root
    return config_from_dict(data)
