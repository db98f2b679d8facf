"""FedOTP's own learning rate (``fedotp.lr``): the optimizer policy of a FedOTP run trains with
it and every other method with the run's ``lr``; null falls back to the run's; a bad value is a
ConfigError naming the key; a config written before the key existed reads as the run's lr."""

from __future__ import annotations

import pytest
import torch

from fedpgp.config import load_config, method_lr, saved_config
from fedpgp.errors import ConfigError
from fedpgp.federation.client import Optimizers
from fedpgp.methods.registry import METHOD_NAMES


def optimizer_lr(overrides: list[str]) -> float:
    """The learning rate of the SGD a client of this config trains with."""
    optimizers = Optimizers.from_config(load_config(None, overrides))
    _, sgd = optimizers.prepare({"ctx": torch.zeros(2, 3)})
    return sgd.param_groups[0]["lr"]


def test_only_fedotp_trains_with_its_section_lr() -> None:
    assert optimizer_lr(["method=fedotp", "lr=0.02"]) == 0.03
    assert optimizer_lr(["method=fedotp", "fedotp.lr=0.5"]) == 0.5
    for name in METHOD_NAMES:
        if name != "fedotp":
            assert optimizer_lr([f"method={name}", "lr=0.02", "fedotp.lr=0.5"]) == 0.02


def test_a_null_fedotp_lr_is_the_runs_lr() -> None:
    assert optimizer_lr(["method=fedotp", "fedotp.lr=null", "lr=0.02"]) == 0.02


@pytest.mark.parametrize("value", ["0", "-0.1", "fast", ".inf"])
def test_a_bad_fedotp_lr_names_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^fedotp\.lr: expected"):
        load_config(None, ["method=fedotp", f"fedotp.lr={value}"])


def test_a_config_written_before_fedotp_lr_reads_as_the_runs_lr() -> None:
    written = load_config(None, ["method=fedotp", "lr=0.02"]).to_dict()
    del written["fedotp"]["lr"]
    cfg = saved_config(written)
    assert cfg.fedotp.lr is None and method_lr(cfg) == 0.02
