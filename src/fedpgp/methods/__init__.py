"""Method registry: the config's ``method`` key names one of these."""

from __future__ import annotations

from ..config import RunConfig
from ..errors import ConfigError
from .base import Method, Tensors
from .fedotp import FedOTP
from .fedpgp import FedPGP
from .fedprox import FedProx
from .local import Local
from .promptfl import PromptFL
from .zeroshot import ZeroShot

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (ZeroShot, Local, PromptFL, FedProx, FedPGP, FedOTP)
}


def create_method(cfg: RunConfig, logit_scale: float, name: str | None = None) -> Method:
    """The method the config names (or ``name``, with the config's settings)."""
    name = cfg.method if name is None else name
    if name not in METHODS:
        raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name](cfg, logit_scale)


__all__ = ["METHODS", "Method", "Tensors", "create_method"]
