"""Every method by name, listed once: config validation, ``fedpgp compare``, the CLI's help and
the Flower apps read this table. It imports no torch (a SuperNode answers a query, and the CLI
prints its help, without loading the methods); :func:`method_class` imports a method's module
only when it is asked for.

A method's hyper-parameters are its config section (``fedpgp:``, ``fedotp:`` ...), declared
here as a dataclass next to its entry: ``ranges`` holds (key, lower, upper, lower inclusive)
as :data:`fedpgp.config.RANGES` does, ``choices`` the allowed values of a key.

Adding a method: its file in ``fedpgp/methods/`` and its entry (with its section, if it has
hyper-parameters) in :data:`REGISTRY`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .base import Method


@dataclass
class FedPGPSettings:
    """FedPGP (docs/method.md section 2): the rank r of U V, the weight mu and temperature tau of
    the contrastive loss, and which hand-crafted prompt anchors it."""

    rank: int = 8
    mu: float = 0.5
    tau: float = 0.5
    anchor: str = "paper"

    ranges: ClassVar[tuple] = (
        ("rank", 1, None, True),
        ("mu", 0, None, True),
        ("tau", 0, None, False),
    )
    choices: ClassVar[dict] = {"anchor": ("paper", "official")}


@dataclass
class FedProxSettings:
    """FedProx (docs/method.md section 3): the weight mu of the proximal term."""

    mu: float = 0.01

    ranges: ClassVar[tuple] = (("mu", 0, None, True),)
    choices: ClassVar[dict] = {}


@dataclass
class FedOTPSettings:
    """FedOTP's optimal transport (docs/method.md section 5)."""

    ot: str = "cot"
    eps: float = 0.01
    thresh: float = 1e-3
    max_iter: int = 100
    top_percent: float = 0.8

    ranges: ClassVar[tuple] = (
        ("eps", 0, None, False),
        ("thresh", 0, None, False),
        ("max_iter", 1, None, True),
        ("top_percent", 0, 1, False),
    )
    choices: ClassVar[dict] = {"ot": ("cot", "sinkhorn")}


@dataclass
class PromptFolioSettings:
    """PromptFolio (docs/method.md section 9): the weight theta of the personal prompt's class
    features in the mix (the authors' 0.4)."""

    theta: float = 0.4

    ranges: ClassVar[tuple] = (("theta", 0, 1, True),)
    choices: ClassVar[dict] = {}


@dataclass(frozen=True)
class MethodInfo:
    """One method: its name (the config's ``method``), where its class lives
    (``fedpgp.methods.<module>.<cls>``), one line for the CLI's help and its config section."""

    name: str
    module: str
    cls: str
    summary: str
    settings: type | None = None


REGISTRY: tuple[MethodInfo, ...] = (
    MethodInfo("zeroshot", "zeroshot", "ZeroShot", "CLIP zero-shot: 'a photo of a {class}.'"),
    MethodInfo("local", "local", "Local", "CoOp per client, nothing shared"),
    MethodInfo("promptfl", "promptfl", "PromptFL", "one CoOp context averaged by the server"),
    MethodInfo("fedprox", "fedprox", "FedProx", "PromptFL plus a proximal term", FedProxSettings),
    MethodInfo(
        "fedpgp", "fedpgp", "FedPGP", "global sigma + personal low-rank U V", FedPGPSettings
    ),
    MethodInfo(
        "fedotp", "fedotp", "FedOTP", "global + local prompts matched by OT", FedOTPSettings
    ),
    MethodInfo(
        "promptfolio",
        "promptfolio",
        "PromptFolio",
        "global + local prompts, class features mixed by theta",
        PromptFolioSettings,
    ),
)

METHOD_NAMES: tuple[str, ...] = tuple(info.name for info in REGISTRY)


def method_info(name: str) -> MethodInfo:
    """The entry of method ``name``; KeyError for an unknown name (config validation names the
    key before this is reached)."""
    for info in REGISTRY:
        if info.name == name:
            return info
    raise KeyError(name)


def method_class(name: str) -> type[Method]:
    """The class of method ``name``, its module imported on first use."""
    info = method_info(name)
    module = importlib.import_module(f"{__package__}.{info.module}")
    cls: Any = getattr(module, info.cls)
    return cls


def methods_help() -> str:
    """One line per method, for the CLI's help."""
    width = max(len(name) for name in METHOD_NAMES)
    return "\n".join(f"  {info.name:<{width}}  {info.summary}" for info in REGISTRY)
