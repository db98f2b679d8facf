"""The ``fedpgp`` command line: ``run`` and the subcommands of the other layers.

Every FedPGPError becomes one line on stderr and exit status 2; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .console import PROGRESS, console
from .errors import FedPGPError

if TYPE_CHECKING:
    from .config import RunConfig

log = logging.getLogger(__name__)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, dotted for sections (e.g. --set rounds=2 "
        "--set backbone.name=ViT-B-16-quickgelu); repeatable",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .errors import ConfigError

    cfg: RunConfig | None = None
    if args.resume:
        if args.out:
            raise ConfigError("--resume DIR continues the run in DIR; --out cannot be given too")
        log.info("resuming the run in %s", args.resume, extra=PROGRESS)
    else:
        cfg = load_config(args.config, args.overrides)
        log.info(
            "run: %s on %s, %d clients, %d rounds",
            cfg.method,
            cfg.dataset.name,
            cfg.num_clients,
            cfg.rounds,
            extra=PROGRESS,
        )
    # Only after that first line: torch and open_clip take seconds to import.
    from .report import format_run
    from .rundir import default_out_dir

    if cfg is None:
        out_dir = Path(args.resume)
    else:
        out_dir = Path(args.out) if args.out else default_out_dir(cfg)
    print(format_run(_train(args, cfg, out_dir)))
    print(f"\nresults in {out_dir}")
    return 0


def _train(args: argparse.Namespace, cfg: RunConfig | None, out_dir: Path) -> dict[str, Any]:
    """The results of ``fedpgp run``: a new run of ``cfg`` into ``out_dir``, or with ``cfg``
    None the resumed run in ``out_dir``, on the runtime ``args`` name."""
    flower = args.runtime == "flower-sim"
    if cfg is None:
        if flower:
            from .federation.flower.sim import resume_flower_simulation

            return resume_flower_simulation(out_dir, args.config, args.overrides)
        from .runner import resume

        return resume(out_dir, args.config, args.overrides)
    if flower:
        from .federation.flower.sim import run_flower_simulation

        return run_flower_simulation(cfg, out_dir)
    from .runner import execute

    return execute(cfg, out_dir)


def cmd_compare(args: argparse.Namespace) -> int:
    import time

    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    log.info(
        "compare on %s: %d clients, %d rounds",
        cfg.dataset.name,
        cfg.num_clients,
        cfg.rounds,
        extra=PROGRESS,
    )
    # Only after that first line: torch and open_clip take seconds to import.
    from .compare import compare, format_comparison, parse_methods, parse_seeds

    methods = parse_methods(args.methods)
    seeds = parse_seeds(args.seeds, cfg.seed)
    out_dir = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-compare")
    rows = compare(cfg, methods, seeds, out_dir)
    print(format_comparison(rows))
    print(f"\ncomparison.md, comparison.csv and comparison.png in {out_dir}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    log.info("table: %d config files, cells in %s", len(args.configs), args.out, extra=PROGRESS)
    # Only after that first line: torch and open_clip take seconds to import.
    from .table import cmd_table as run_table

    return run_table(args)


def add_table_command(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fedpgp table`` to the CLI's subparsers."""
    from .methods.registry import COMPARED, methods_help

    table = subparsers.add_parser(
        "table",
        help="the paper's main table: every config x method x seed, resumable",
        description="Run every dataset config x method x seed, each cell a run directory\n"
        "DIR/<config file stem>/<method>/seed<s> (`fedpgp run --resume CELL` works on it), and\n"
        "write DIR/table.md, table.csv and table.png: per dataset Local / Base / Novel / HM,\n"
        "mean ± std over seeds, per method, and their average over the datasets. Run the same\n"
        "command again after an interruption: finished cells are kept, an interrupted one\n"
        "resumes from its last checkpoint.",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    table.add_argument(
        "--configs",
        nargs="+",
        required=True,
        metavar="FILE",
        help="YAML configs, one per dataset (see configs/); --methods replaces each\nfile's method",
    )
    table.add_argument(
        "--methods",
        help=f"comma-separated, or all (default:\n{','.join(COMPARED)}); the methods:\n"
        f"{methods_help()}",
    )
    table.add_argument("--seeds", help="comma-separated seeds (default: each config's seed)")
    table.add_argument(
        "--out", default="runs/table", help="folder of the cells and tables (default: runs/table)"
    )
    table.add_argument(
        "--dry-run",
        action="store_true",
        help="list every cell with its state (finished, interrupted at round r of R,\n"
        "new) and whether its image features are cached; run and write nothing",
    )
    table.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of every config, dotted for sections\n(e.g. --set rounds=2); "
        "repeatable",
    )
    table.set_defaults(func=cmd_table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpgp", description="Federated prompt learning on a frozen CLIP (FedPGP)."
    )
    from .methods.registry import COMPARED, methods_help

    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="train one method across simulated clients",
        description=f"The methods (config key 'method'):\n{methods_help()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(run)
    run.add_argument("--out", help="run directory (default: runs/<time>-<method>-<dataset>)")
    run.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the interrupted run in DIR from its last checkpoint, with the config in "
        "DIR/config.yaml (--config/--set may repeat it but not change it); with the runtime "
        "it was started with",
    )
    run.add_argument(
        "--runtime",
        choices=("inprocess", "flower-sim"),
        default="inprocess",
        help="inprocess (default): every client in this process; flower-sim: Flower's "
        "simulation engine, one virtual SuperNode per client (docs/flower.md)",
    )
    run.set_defaults(func=cmd_run)
    comp = sub.add_parser(
        "compare",
        help="several methods on one partition, over seeds",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    _add_config_args(comp)
    comp.add_argument(
        "--methods",
        help=f"comma-separated, or all (default: {','.join(COMPARED)}: every method whose round "
        f"costs under 3x FedPGP's); the methods:\n{methods_help()}",
    )
    comp.add_argument("--seeds", help="comma-separated seeds (default: the config's seed)")
    comp.add_argument("--out", help="output folder (default: runs/<time>-compare)")
    comp.set_defaults(func=cmd_compare)
    add_table_command(sub)
    from .use_commands import add_use_commands

    add_use_commands(sub, _add_config_args)
    from .data.commands import add_data_commands

    add_data_commands(sub)
    from .world.commands import add_world_commands

    add_world_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedpgp`` command."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with console():
            return int(args.func(args))
    except FedPGPError as exc:
        print(f"fedpgp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedpgp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
