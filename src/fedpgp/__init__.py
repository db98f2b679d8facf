"""fedpgp: federated prompt learning on a frozen CLIP (FedPGP and its baselines)."""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    # ``fedpgp.load_classifier`` without importing torch for every ``import fedpgp``.
    if name == "load_classifier":
        from .classifier import load_classifier

        return load_classifier
    raise AttributeError(f"module 'fedpgp' has no attribute {name!r}")
