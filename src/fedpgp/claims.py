"""The paper's qualitative claims as checks on the final metrics of one seed's runs.

``benchmarks/world_dynamics.py`` checks :data:`BENCHMARK_CLAIMS` on the world over several
seeds, running :data:`BENCHMARK_METHODS`; the tests check :data:`CLAIMS` on one, running
:data:`CLAIM_METHODS`; both through :func:`fedpgp.compare.compare`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .compare import compare
from .config import RunConfig

CLAIM_METHODS = ("zeroshot", "local", "promptfl", "fedpgp")
# FedOTP's run (about twice FedPGP's) would lengthen the test suite's claims test by 2 to 5
# minutes, so its claim (docs/world.md, "FedOTP on the world") is the benchmark's only.
BENCHMARK_METHODS = (*CLAIM_METHODS, "fedotp")

Finals = dict[str, dict[str, float]]


@dataclass(frozen=True)
class Claim:
    """``higher``'s metric exceeds ``lower``'s by more than ``offset`` points (by at least
    ``offset`` when ``inclusive``). Each side is (method, metric)."""

    higher: tuple[str, str]
    lower: tuple[str, str]
    offset: float = 0.0
    inclusive: bool = False

    @property
    def text(self) -> str:
        relation = ">=" if self.inclusive else ">"
        plus = f" + {self.offset:g}" if self.offset else ""
        return f"{' '.join(self.higher)} {relation} {' '.join(self.lower)}{plus}"

    def gap(self, finals: Finals) -> float:
        """Points by which the claim holds (negative: by which it fails)."""
        (hm, hk), (lm, lk) = self.higher, self.lower
        return finals[hm][hk] - finals[lm][lk] - self.offset

    def holds(self, finals: Finals) -> bool:
        gap = self.gap(finals)
        return gap >= 0 if self.inclusive else gap > 0


CLAIMS = (
    Claim(("fedpgp", "local"), ("zeroshot", "local"), offset=10, inclusive=True),
    Claim(("fedpgp", "local"), ("promptfl", "local")),
    Claim(("fedpgp", "novel"), ("local", "novel")),
    Claim(("promptfl", "base"), ("local", "base")),
)
BENCHMARK_CLAIMS = (*CLAIMS, Claim(("fedotp", "local"), ("zeroshot", "local")))


def measure(
    cfg: RunConfig, seeds: list[int], methods: tuple[str, ...] = CLAIM_METHODS
) -> dict[int, Finals]:
    """Final Local / Base / Novel / HM of each of ``methods`` for every seed, from ``cfg``."""
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        compare(cfg, list(methods), seeds, out_dir)

        def final(method: str, seed: int) -> dict[str, float]:
            results = out_dir / method / f"seed{seed}" / "results.json"
            return json.loads(results.read_text())["final"]

        return {seed: {m: final(m, seed) for m in methods} for seed in seeds}
