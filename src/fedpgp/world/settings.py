"""The world CLIP's name and pretraining settings, kept free of torch so that building the
command line's parser (its defaults come from here) imports no heavy library."""

from __future__ import annotations

from dataclasses import dataclass

MODEL_NAME = "fedpgp-world"


@dataclass(frozen=True)
class PretrainSettings:
    """Hyper-parameters of the world pretraining; the defaults made the shipped weights."""

    seed: int = 0
    steps: int = 1500
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    pool_per_class: int = 300
    threads: int = 2
    eval_per_class: int = 20
    log_every: int = 100
