"""A trained run read back: its config and every tensor it learned (the GLOBAL ones, each
client's PERSONAL ones), from its newest checkpoint; and ``fedpgp eval``, which evaluates them
on the run's own data or on another dataset, partition, shot count or seed (docs/using.md).

A finished run's last checkpoint is of its last round, so a finished and an interrupted run are
read the same way. A Flower run keeps its clients' PERSONAL state on the nodes: flower-sim's are
in the run directory (``nodes/``) and are read from there; a deployment's are not, and only its
global prompt can be used here.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .atomic import write_text_atomic
from .checkpoint import Checkpoint, complete_checkpoints, load_checkpoint
from .config import (
    SECTIONS,
    DatasetConfig,
    RunConfig,
    apply_overrides,
    config_changes,
    config_from_dict,
    describe_changes,
    read_yaml,
    run_digest,
    saved_config,
)
from .data.datasets import image_file
from .errors import CheckpointError, ConfigError
from .evaluation import evaluate_clients, summarize, zero_shot_rows
from .experiment import EvalSet, Experiment, build_experiment
from .methods.base import Method, Tensors
from .methods.registry import method_class
from .report import SUMMARY_KEYS, format_table
from .rundir import CONFIG, RunDir, check_output_folder

log = logging.getLogger("fedpgp")

# What gives a run's tensors their meaning: an evaluation keeps the run's values.
METHOD_KEYS = ("method", "n_ctx", *(info.name for info in SECTIONS))
EVAL_JSON, EVAL_CSV, PREDICTIONS_CSV = "eval.json", "eval.csv", "predictions.csv"


@dataclass
class TrainedRun:
    """A run directory's config and learned tensors after ``round`` rounds. ``personal`` maps
    every client to its PERSONAL tensors; a Flower run's are read by :meth:`bind` (None where
    they stay on a deployment's nodes)."""

    path: Path
    cfg: RunConfig
    round: int
    finished: bool
    global_tensors: Tensors
    personal: dict[int, Tensors] | None
    checkpoint: Checkpoint

    @classmethod
    def open(cls, path: str | Path) -> TrainedRun:
        """Read the run in ``path``; CheckpointError when it is not a run directory or has no
        complete checkpoint, naming the path."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"RUN {path}: not a folder; expected a fedpgp run directory")
        if not (path / CONFIG).is_file():
            raise CheckpointError(
                f"RUN {path}: no {CONFIG}; not a fedpgp run directory (made by `fedpgp run`)"
            )
        cfg = saved_config(read_yaml(path / CONFIG))
        if not complete_checkpoints(path):
            raise CheckpointError(
                f"RUN {path}: no complete checkpoint yet (the run stopped before its first); "
                f"nothing has been learned to read back"
            )
        checkpoint = load_checkpoint(path, cfg, method_class(cfg.method).trained_keys())
        state = checkpoint.state
        personal = None
        if not state.node_rounds:
            personal = {cid: dict(state.personal.get(cid, {})) for cid in range(cfg.num_clients)}
        return cls(
            path,
            cfg,
            state.round,
            (path / "results.json").is_file(),
            dict(state.global_tensors),
            personal,
            checkpoint,
        )

    @property
    def from_flower(self) -> bool:
        return bool(self.checkpoint.state.node_rounds)

    def bind(self, method: Method, width: int) -> None:
        """Check the tensors against what ``method`` trains for a text tower of ``width``
        (names, shapes, dtypes: CheckpointError naming the file), and read a flower-sim run's
        PERSONAL tensors from its node state files."""
        initial = {cid: method.initial_personal(width, cid) for cid in range(self.cfg.num_clients)}
        digest = self.checkpoint.partition_digest
        if not self.from_flower:
            self.checkpoint.check_fits(method.initial_global(width), initial, digest)
            return
        self.checkpoint.check_fits(method.initial_global(width), None, digest)
        self.personal = _node_personal(
            self.path, self.cfg, self.checkpoint.state.node_rounds, initial
        )

    def check_client(self, method: Method, client: int) -> None:
        """ConfigError unless ``client`` is one of the run's clients with a prompt of its own."""
        clients = self.cfg.num_clients
        if not 0 <= client < clients:
            raise ConfigError(
                f"--client {client}: the run {self.path} has clients 0 to {clients - 1}"
            )
        if not method.personal_keys:
            raise ConfigError(
                f"--client {client}: method {method.name} has no personal prompt (every client "
                f"predicts with the global tensors); use --global"
            )
        if self.personal is None:
            raise CheckpointError(
                f"--client {client}: the personal prompts of {self.path} stay on its Flower "
                f"nodes (in their state-dir); only --global can be read from the run directory"
            )

    def client_params(self, method: Method, client: int) -> Tensors:
        """The tensors client ``client`` predicts with: the GLOBAL ones and its PERSONAL ones,
        as the method merges them."""
        personal = {} if self.personal is None else self.personal[client]
        return method.merge({**{k: self.global_tensors[k] for k in method.global_keys}, **personal})

    def global_predictor(self, method: Method) -> tuple[str, Tensors]:
        """(method name, tensors) of the run's global prompt; ConfigError for a method without
        one."""
        predictor = method.global_predictor(self.global_tensors)
        if predictor is None:
            raise ConfigError(
                f"--global: method {method.name} has no global prompt (every client trains its "
                f"own); use --client N"
            )
        return predictor


def _node_personal(
    path: Path, cfg: RunConfig, node_rounds: Mapping[int, int], initial: Mapping[int, Tensors]
) -> dict[int, Tensors] | None:
    """Every partition's PERSONAL tensors from flower-sim's node state files in ``path`` (a
    partition never trained holds ``initial``'s), or None for a deployment, whose nodes keep
    them (no ``nodes/`` folder here)."""
    from .federation.flower.state import load_state, state_folder

    nodes = path / "nodes"
    if not nodes.is_dir():
        return None
    run_id = RunDir.read_info(path).run_id
    personal: dict[int, Tensors] = {}
    for cid in range(cfg.num_clients):
        round = node_rounds.get(cid, 0)
        if round == 0:
            personal[cid] = dict(initial[cid])
            continue
        folder = state_folder(nodes, run_id, cid)
        personal[cid], _ = load_state(folder, cid, round, run_id, run_digest(cfg), initial[cid])
    return personal


def eval_config(
    run: TrainedRun, config_path: str | Path | None = None, overrides: Sequence[str] = ()
) -> RunConfig:
    """The config of an evaluation of ``run``: the run's, with the keys the ``config_path``
    file sets (a dataset, partition, shot count or seed) and then ``overrides``. The method,
    n_ctx and method sections are always the run's (a file's are ignored; ``--set`` may not
    change them); the backbone and the number of clients must stay the run's. No training
    view is encoded: ``augment`` is none."""
    data = run.cfg.to_dict()
    if config_path is not None:
        given = read_yaml(config_path)
        for key, value in given.items():
            if key in METHOD_KEYS:
                continue
            if key == "dataset" and isinstance(value, dict):
                if value.get("name", data["dataset"]["name"]) != data["dataset"]["name"]:
                    # Another dataset's options would not be this one's.
                    data["dataset"] = dataclasses.asdict(DatasetConfig())
                data["dataset"].update(copy.deepcopy(value))
            elif isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key].update(copy.deepcopy(value))
            else:
                data[key] = copy.deepcopy(value)
    data = apply_overrides(data, list(overrides))
    data["augment"] = "none"
    cfg = config_from_dict(data)
    changes = config_changes(run.cfg.to_dict(), cfg.to_dict())
    fixed = {k: v for k, v in changes.items() if k.split(".")[0] in METHOD_KEYS}
    if fixed:
        raise ConfigError(
            f"--set would change what the run's tensors mean ({describe_changes(fixed)}); an "
            f"evaluation keeps the run's method, n_ctx and method sections"
        )
    if cfg.backbone != run.cfg.backbone:
        raise ConfigError(
            f"backbone: the run {run.path} was trained on {_backbone_name(run.cfg)}, this "
            f"evaluation would use {_backbone_name(cfg)}; its prompts only fit the backbone they "
            f"were trained on"
        )
    if cfg.num_clients != run.cfg.num_clients:
        raise ConfigError(
            f"num_clients: the run {run.path} has {run.cfg.num_clients} clients, each with its "
            f"own prompt; the evaluation's partition must have as many (got {cfg.num_clients})"
        )
    return cfg


def _backbone_name(cfg: RunConfig) -> str:
    b = cfg.backbone
    source = b.file or (f"pretrained {b.pretrained}" if b.pretrained else f"seed {b.init_seed}")
    return f"{b.name} ({source})"


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def _rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "summary": {k: _rounded(v) for k, v in summarize(rows).items()},
        "clients": [
            {
                "id": r["id"],
                "n_train": r["n_train"],
                **{k: _rounded(r[k]) for k in ("local", "base", "novel")},
            }
            for r in rows
        ],
    }


def _on(tensors: Mapping[str, Tensor], device: torch.device) -> Tensors:
    return {k: v.to(device) for k, v in tensors.items()}


@dataclass
class _Prompt:
    """One kind of prompt evaluated: every client's personalized one, or the global one."""

    kind: str
    experiment: Experiment
    params: dict[int, Tensors]


def _prompts(run: TrainedRun, experiment: Experiment) -> list[_Prompt]:
    method, device = experiment.method, experiment.backbone.device
    clients = sorted(experiment.client_data)
    prompts = []
    if method.personal_keys and run.personal is not None:
        params = {cid: _on(run.client_params(method, cid), device) for cid in clients}
        prompts.append(_Prompt("personal", experiment, params))
    predictor = method.global_predictor(run.global_tensors)
    if predictor is not None:
        name, tensors = predictor
        shared = _on(tensors, device)
        view = experiment.with_method(name, method.label_space)
        prompts.append(_Prompt("global", view, dict.fromkeys(clients, shared)))
    return prompts


def _test_sets(experiment: Experiment, client: int) -> dict[str, tuple[EvalSet, list[int]]]:
    """Each metric's test set of ``client`` with the dataset's test indices of its rows."""
    manifest = experiment.manifest
    sets = {
        "local": (experiment.client_data[client].local, manifest.clients[client].test),
        "base": (experiment.base, manifest.base_test),
    }
    if experiment.novel is not None:
        sets["novel"] = (experiment.novel, manifest.novel_test)
    return sets


def per_image_predictions(
    experiment: Experiment, prompt: str, params: Mapping[int, Tensors]
) -> str:
    """CSV rows (prompt, client, set, index, file, label, predicted) of every test image of
    every client: what each prompt predicts, by class name."""
    images = experiment.splits.test.images
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for cid in sorted(params):
        for name, (test_set, indices) in _test_sets(experiment, cid).items():
            if len(test_set) == 0:
                continue
            with torch.no_grad():
                predicted = experiment.method.predict(params[cid], test_set.bank, test_set.features)
            names = test_set.bank.classnames
            for index, label, guess in zip(
                indices, test_set.labels.tolist(), predicted.tolist(), strict=True
            ):
                path = image_file(images, index)
                writer.writerow(
                    [
                        prompt,
                        cid,
                        name,
                        index,
                        "" if path is None else path,
                        names[label],
                        names[guess],
                    ]
                )
    return buffer.getvalue()


def evaluate_run(
    run: TrainedRun, cfg: RunConfig, out_dir: Path, per_image: bool = False
) -> dict[str, Any]:
    """Evaluate every prompt of ``run`` (each client's personalized one, the global one) and
    CLIP zero-shot on the data of ``cfg``; write config.yaml, eval.csv, predictions.csv with
    ``per_image`` and, last, eval.json into ``out_dir``. Returns eval.json's content."""
    out_dir = Path(out_dir)
    if (out_dir / EVAL_JSON).exists():
        raise ConfigError(f"--out {out_dir}: already holds an evaluation; choose another folder")
    check_output_folder(out_dir)
    experiment = build_experiment(cfg)
    method, width = experiment.method, experiment.backbone.text_width
    run.bind(method, width)
    clients = sorted(experiment.client_data)
    document: dict[str, Any] = {
        "run": str(run.path),
        "method": method.name,
        "round": run.round,
        "finished": run.finished,
        "dataset": cfg.dataset.name,
        "seed": cfg.seed,
        "zeroshot": _rows(zero_shot_rows(experiment, clients)),
    }
    prompts = _prompts(run, experiment)
    if run.personal is None and method.personal_keys:
        log.warning("the clients' personal prompts stay on the Flower nodes: global prompt only")
    predictions = []
    for prompt in prompts:
        rows = evaluate_clients(prompt.experiment, prompt.params)
        document[prompt.kind] = {"predictor": prompt.experiment.method.name, **_rows(rows)}
        if per_image:
            predictions.append(per_image_predictions(prompt.experiment, prompt.kind, prompt.params))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / CONFIG, cfg.to_yaml())
    write_text_atomic(out_dir / EVAL_CSV, eval_csv(document))
    if per_image:
        header = "prompt,client,set,index,file,label,predicted\n"
        write_text_atomic(out_dir / PREDICTIONS_CSV, header + "".join(predictions))
    write_text_atomic(out_dir / EVAL_JSON, json.dumps(document, indent=2) + "\n")
    return document


PROMPT_KINDS = ("zeroshot", "personal", "global")


def eval_csv(document: Mapping[str, Any]) -> str:
    """One row per prompt kind and client."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["prompt", "client", "n_train", "local", "base", "novel"])
    for kind in PROMPT_KINDS:
        for row in document.get(kind, {}).get("clients", []):
            writer.writerow(
                [kind, row["id"], row["n_train"], row["local"], row["base"], row["novel"]]
            )
    return buffer.getvalue()


def format_eval(document: Mapping[str, Any]) -> str:
    """The evaluation's summary next to CLIP zero-shot's."""
    labels = {
        "zeroshot": "CLIP zero-shot",
        "personal": f"{document['method']} (each client's prompt)",
        "global": f"{document['method']} (global prompt)",
    }
    rows = [
        [labels[kind], *(document[kind]["summary"][k] for k in SUMMARY_KEYS)]
        for kind in PROMPT_KINDS
        if kind in document
    ]
    state = "finished" if document["finished"] else "interrupted"
    return (
        f"{document['method']} after round {document['round']} ({state}), evaluated on "
        f"{document['dataset']}, seed {document['seed']}:\n"
        + format_table(["", "Local", "Base", "Novel", "HM"], rows)
    )
