"""The paper's qualitative claims, measured on the offline world (issue 4).

Runs zeroshot, local, promptfl and fedpgp on the default config (the world, 10 clients,
pathological partition) for each seed and checks, per seed:

- FedPGP's Local is at least 10 points above CLIP zero-shot's Local;
- FedPGP's Local is above PromptFL's Local;
- FedPGP's Novel is above local CoOp's Novel;
- PromptFL's Base is above local CoOp's Base.

Zero-shot's Novel is printed next to every trained method's Novel (a finding, not a check).

    python benchmarks/world_dynamics.py [--seeds 0,1,2] [--set key=value ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fedpgp.compare import compare, parse_seeds
from fedpgp.config import load_config
from fedpgp.report import format_table

METHODS = ["zeroshot", "local", "promptfl", "fedpgp"]
CLAIMS = {
    "fedpgp local >= zeroshot local + 10": lambda r: (
        r["fedpgp"]["local"] >= r["zeroshot"]["local"] + 10
    ),
    "fedpgp local > promptfl local": lambda r: r["fedpgp"]["local"] > r["promptfl"]["local"],
    "fedpgp novel > local novel": lambda r: r["fedpgp"]["novel"] > r["local"]["novel"],
    "promptfl base > local base": lambda r: r["promptfl"]["base"] > r["local"]["base"],
}


def finals(out_dir: Path, seed: int) -> dict[str, dict[str, float]]:
    """Final metrics of every method for one seed, read back from the run files."""
    return {
        method: json.loads((out_dir / method / f"seed{seed}" / "results.json").read_text())["final"]
        for method in METHODS
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    cfg = load_config(None, args.overrides)
    seeds = parse_seeds(args.seeds, cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        compare(cfg, METHODS, seeds, out_dir)
        per_seed = {seed: finals(out_dir, seed) for seed in seeds}
    verdicts = {
        claim: {seed: bool(check(per_seed[seed])) for seed in seeds}
        for claim, check in CLAIMS.items()
    }
    if args.json:
        print(json.dumps({"finals": per_seed, "claims": verdicts}))
    else:
        rows = [
            [f"{m} (seed {s})", *(per_seed[s][m][k] for k in ("local", "base", "novel", "hm"))]
            for s in seeds
            for m in METHODS
        ]
        print(format_table(["run", "Local", "Base", "Novel", "HM"], rows))
        print()
        for claim, by_seed in verdicts.items():
            marks = ", ".join(f"seed {s}: {'yes' if ok else 'NO'}" for s, ok in by_seed.items())
            print(f"{claim}: {marks}")
    return 0 if all(all(v.values()) for v in verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
