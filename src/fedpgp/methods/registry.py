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
    """FedOTP's optimal transport (docs/method.md section 5) and the learning rate of its local
    steps (null: the run's ``lr``)."""

    ot: str = "cot"
    eps: float = 0.01
    thresh: float = 1e-3
    max_iter: int = 100
    top_percent: float = 0.8
    # The world's default (docs/world.md, "FedOTP on the world"): from the patch tokens'
    # zero-shot level, FedOTP is still learning at round 20 with the run's clipped lr 0.01.
    lr: float | None = 0.03

    ranges: ClassVar[tuple] = (
        ("lr", 0, None, False),
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


@dataclass
class FedTPGSettings:
    """FedTPG (docs/method.md section 10): the heads of the generator's cross-attention, and
    the authors' protocol: each client trains over its own classes and the server averages
    unweighted."""

    heads: int = 4
    label_space: str = "client"
    aggregation: str = "mean"

    ranges: ClassVar[tuple] = (("heads", 1, None, True),)
    choices: ClassVar[dict] = {
        "label_space": ("client", "all"),
        "aggregation": ("mean", "weighted"),
    }


@dataclass
class FedCoCoOpSettings:
    """FedCoCoOp (docs/method.md section 11): the meta-network's bottleneck is E / reduction
    (the authors' 16)."""

    reduction: int = 16

    ranges: ClassVar[tuple] = (("reduction", 1, None, True),)
    choices: ClassVar[dict] = {}


@dataclass
class PFedMoAPSettings:
    """pFedMoAP (docs/method.md section 12): how many prompts a client mixes (its own and
    num_experts - 1 others'; null: min(10, num_clients), the authors' choice), the weight of the
    client's own logits, the attention's scaling, and the gating network's width and heads."""

    num_experts: int | None = None
    local_weight: float = 0.5
    scaling: float = 10.0
    gating_dim: int = 128
    gating_heads: int = 8

    ranges: ClassVar[tuple] = (
        ("num_experts", 1, None, True),
        ("local_weight", 0, None, True),
        ("scaling", 0, None, False),
        ("gating_dim", 1, None, True),
        ("gating_heads", 1, None, True),
    )
    choices: ClassVar[dict] = {}


@dataclass
class VPTSettings:
    """VPT (docs/method.md section 14): ``length`` vision prompt tokens appended before block 0
    and, with ``depth`` > 1, fresh ones replacing them before blocks 1 .. depth - 1 (the
    authors' 4 tokens at depth 1)."""

    length: int = 4
    depth: int = 1

    ranges: ClassVar[tuple] = (("length", 1, None, True), ("depth", 1, None, True))
    choices: ClassVar[dict] = {}


@dataclass
class IVLPSettings:
    """IVLP (docs/method.md section 14): independent text and vision prompts, each with its
    length and depth (the authors' 2 tokens at depth 1 in both towers)."""

    text_length: int = 2
    vision_length: int = 2
    text_depth: int = 1
    vision_depth: int = 1

    ranges: ClassVar[tuple] = (
        ("text_length", 1, None, True),
        ("vision_length", 1, None, True),
        ("text_depth", 1, None, True),
        ("vision_depth", 1, None, True),
    )
    choices: ClassVar[dict] = {}


@dataclass
class MaPLeSettings:
    """MaPLe (docs/method.md section 14): ``length`` text prompt tokens per block, projected
    into the image tower, in blocks 0 .. depth - 1 of both towers (null: three quarters of the
    shallower tower, rounded: the authors' 9 of 12 blocks)."""

    length: int = 2
    depth: int | None = None

    ranges: ClassVar[tuple] = (("length", 1, None, True), ("depth", 1, None, True))
    choices: ClassVar[dict] = {}


@dataclass
class FedMGPSettings:
    """FedMGP (docs/method.md section 15): ``groups`` pairs of text and vision prompts, of which
    a client uploads ``selected``, drawn by softmax(similarity / temperature) to last round's
    global groups; the diversity term of weight ``weight`` as the authors coded it (official,
    pulling groups together) or with the paper's sign (paper, pushing them apart); text and
    vision groups drawn independently (the authors') or jointly on the summed similarity."""

    groups: int = 5
    selected: int = 2
    text_length: int = 2
    vision_length: int = 2
    temperature: float = 1.0
    weight: float = 1.0
    diversity: str = "official"
    selection: str = "independent"

    ranges: ClassVar[tuple] = (
        ("groups", 1, None, True),
        ("selected", 1, None, True),
        ("text_length", 1, None, True),
        ("vision_length", 1, None, True),
        ("temperature", 0, None, False),
        ("weight", 0, None, True),
    )
    choices: ClassVar[dict] = {
        "diversity": ("official", "paper"),
        "selection": ("independent", "joint"),
    }


@dataclass
class PFedMMASettings:
    """pFedMMA (docs/method.md section 16): adapters of width ``dim`` in the top ``blocks``
    blocks of both towers (null: two thirds of the shallower tower, rounded: the authors' 8 of
    12), their output scaled by ``scale``."""

    blocks: int | None = None
    dim: int = 32
    scale: float = 0.001

    ranges: ClassVar[tuple] = (
        ("blocks", 1, None, True),
        ("dim", 1, None, True),
        ("scale", 0, None, False),
    )
    choices: ClassVar[dict] = {}


@dataclass(frozen=True)
class MethodInfo:
    """One method: its name (the config's ``method``), where its class lives
    (``fedpgp.methods.<module>.<cls>``), one line for the CLI's help, its config section, and
    whether its round costs over 3x FedPGP's on the world (benchmarks/bench_methods.py), which
    leaves it out of ``fedpgp compare``'s default list."""

    name: str
    module: str
    cls: str
    summary: str
    settings: type | None = None
    costly: bool = False


REGISTRY: tuple[MethodInfo, ...] = (
    MethodInfo("zeroshot", "zeroshot", "ZeroShot", "CLIP zero-shot: 'a photo of a {class}.'"),
    MethodInfo("local", "local", "Local", "CoOp per client, nothing shared"),
    MethodInfo("promptfl", "promptfl", "PromptFL", "one CoOp context averaged by the server"),
    MethodInfo("fedprox", "fedprox", "FedProx", "PromptFL plus a proximal term", FedProxSettings),
    MethodInfo(
        "fedpgp", "fedpgp", "FedPGP", "global sigma + personal low-rank U V", FedPGPSettings
    ),
    MethodInfo(
        "fedotp",
        "fedotp",
        "FedOTP",
        "global + local prompts matched by OT",
        FedOTPSettings,
        costly=True,
    ),
    MethodInfo(
        "promptfolio",
        "promptfolio",
        "PromptFolio",
        "global + local prompts, class features mixed by theta",
        PromptFolioSettings,
    ),
    MethodInfo(
        "fedtpg",
        "fedtpg",
        "FedTPG",
        "a global generator makes the context from the class names",
        FedTPGSettings,
    ),
    MethodInfo(
        "fedcocoop",
        "fedcocoop",
        "FedCoCoOp",
        "a global context shifted per image by a global meta-network",
        FedCoCoOpSettings,
        costly=True,
    ),
    MethodInfo(
        "pfedmoap",
        "pfedmoap",
        "PFedMoAP",
        "own prompt mixed with other clients' prompts by a personal gating",
        PFedMoAPSettings,
    ),
    MethodInfo(
        "vpt", "vpt", "VPT", "vision prompts in the image tower, hand-crafted text", VPTSettings
    ),
    MethodInfo(
        "ivlp", "ivlp", "IVLP", "independent text and vision prompts, all global", IVLPSettings
    ),
    MethodInfo(
        "maple", "maple", "MaPLe", "text prompts projected into the image tower", MaPLeSettings
    ),
    MethodInfo(
        "fedmgp",
        "fedmgp",
        "FedMGP",
        "groups of text-vision prompts, selected groups shared",
        FedMGPSettings,
        costly=True,
    ),
    MethodInfo(
        "pfedmma",
        "pfedmma",
        "PFedMMA",
        "adapters in both towers, only their shared projection global",
        PFedMMASettings,
    ),
)

METHOD_NAMES: tuple[str, ...] = tuple(info.name for info in REGISTRY)
# ``fedpgp compare``'s default: every method but the costly ones (``--methods all`` runs all).
COMPARED: tuple[str, ...] = tuple(info.name for info in REGISTRY if not info.costly)


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
