"""Learnable contexts and prompt assembly.

A prompt for class c is ``[SOS] ctx_1 .. ctx_M <class name tokens> . [EOT]``. The context is
shared by all classes, so a learned context transfers to any class list by rebuilding the bank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .backbone import FrozenCLIP
from .backbone.frozen import Adapters, check_adapters, check_deep
from .backbone.text import SharedPrefixEncoder, shared_prefix_supported
from .data.datasets import normalize_classname
from .errors import ConfigError

HAND_CRAFTED = "a photo of a {}."


class PromptTemplate(NamedTuple):
    """How a method's prompts are built: ``n_ctx`` learned context tokens after [SOS], then
    ``suffix`` with the class name in its ``{}``; ``key`` is the config key that sets n_ctx,
    named when a prompt does not fit the text tower."""

    n_ctx: int
    suffix: str = "{}."
    key: str = "n_ctx"


def normal_init(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """N(0, 0.02^2), the initialisation of every context tensor (docs/method.md section 1)."""
    return torch.randn(shape, generator=generator) * 0.02


def linear_init(fan_out: int, fan_in: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """PyTorch's default nn.Linear initialisation, weight and bias U(-1/sqrt(fan_in), ..), drawn
    from ``generator``."""
    bound = 1.0 / math.sqrt(fan_in)
    weight = (torch.rand((fan_out, fan_in), generator=generator) * 2 - 1) * bound
    bias = (torch.rand((fan_out,), generator=generator) * 2 - 1) * bound
    return weight, bias


def xavier_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """nn.init.xavier_uniform_ of a (fan_out, fan_in) matrix, drawn from ``generator``."""
    bound = math.sqrt(6.0 / (shape[0] + shape[1]))
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def coop_context(n_ctx: int, width: int, generator: torch.Generator) -> dict[str, Tensor]:
    """A CoOp context ``ctx`` (M x D)."""
    return {"ctx": normal_init((n_ctx, width), generator)}


def personalized_prompt(sigma: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """p_i = sigma + U_i V_i (FedPGP, eq. 1 of the paper)."""
    return sigma + U @ V


class PromptBank:
    """The frozen token embeddings of ``[SOS] . <suffix> [EOT]`` for a list of class names, into
    which any context (M x D) is inserted. Built once per class list; cut at the longest EOT.
    The suffix is ``suffix`` with the class name in its ``{}``: ``"{}."`` (CoOp's prompt) by
    default, ``"of a {}."`` for the methods whose context replaces the first words of "a photo
    of a {}." (BASELINES.md Part B, section 0).

    Encoding shares the ``[SOS] ctx`` prefix between classes (:mod:`fedpgp.backbone.text`) when the
    text tower allows it, and otherwise runs the assembled prompts through the text tower.
    """

    def __init__(
        self,
        backbone: FrozenCLIP,
        classnames: list[str],
        n_ctx: int,
        suffix: str = "{}.",
        key: str = "n_ctx",
    ) -> None:
        if suffix.count("{}") != 1:
            raise ConfigError(f"prompt suffix {suffix!r}: expected one {{}} for the class name")
        self.backbone = backbone
        # Normalised as the loaders do, so "ice_cream" and "ice cream" give the same prompt.
        self.classnames = [normalize_classname(name) for name in classnames]
        self.n_ctx = n_ctx
        self.template = PromptTemplate(n_ctx, suffix, key)
        ids, eot = backbone.tokenize([suffix.format(name) for name in self.classnames])
        needed = int(eot.max()) + 1 + n_ctx
        if needed > backbone.context_length:
            longest = self.classnames[int(eot.argmax())]
            raise ConfigError(
                f"{key}: {n_ctx} context tokens plus the prompt {suffix.format(longest)!r} need "
                f"{needed} positions, the model '{backbone.name}' has {backbone.context_length}"
            )
        length = int(eot.max()) + 1
        with torch.no_grad():
            embedded = backbone.embed_tokens(ids[:, :length])
        self.prefix = embedded[:, :1]
        self.suffix = embedded[:, 1:]
        self.eot = eot + n_ctx
        self._anchors: dict[str, Tensor] = {}
        self._names: Tensor | None = None
        self._shared: SharedPrefixEncoder | None = None
        if shared_prefix_supported(backbone):
            # Suffix c holds the tokens after SOS up to and including its EOT: eot_c of them.
            self._shared = SharedPrefixEncoder(backbone, self.suffix, eot, 1 + n_ctx)

    def __len__(self) -> int:
        return len(self.classnames)

    def assemble(self, contexts: Tensor) -> Tensor:
        """Prompt embeddings for every (context, class) pair: contexts (P, M, D) -> (P*C, L, D)."""
        count, classes = contexts.shape[0], len(self.classnames)
        ctx = contexts.unsqueeze(1).expand(count, classes, *contexts.shape[1:])
        prefix = self.prefix.unsqueeze(0).expand(count, *self.prefix.shape)
        suffix = self.suffix.unsqueeze(0).expand(count, *self.suffix.shape)
        return torch.cat([prefix, ctx, suffix], dim=2).flatten(0, 1)

    def encode(
        self, contexts: Tensor, deep: Sequence[Tensor] = (), adapters: Adapters | None = None
    ) -> Tensor:
        """Normalised text features of each context with every class: (P, M, D) -> (P, C, E).
        A single context (M, D) gives (C, E). ``deep[i - 1]`` (M_i, D) shared by the contexts,
        or (P, M_i, D) one per context, replaces the hidden states of the first M_i context
        positions before text block i (deep prompts); ``adapters`` (block index -> adapter)
        add their term to their block's output."""
        single = contexts.dim() == 2
        batch = (contexts.unsqueeze(0) if single else contexts).to(self.prefix.device)
        count = batch.shape[0]
        blocks = len(self.backbone.text.transformer.resblocks)
        if deep:
            check_deep(deep, blocks, self.n_ctx)
        if adapters:
            check_adapters(adapters, blocks)
        if single:
            deep = [tokens.unsqueeze(0) if tokens.dim() == 2 else tokens for tokens in deep]
        if self._shared is not None:
            sos = self.prefix[0].expand(count, -1, -1)
            features = self._shared.encode(torch.cat([sos, batch], dim=1), deep, adapters)
        else:
            classes = len(self.classnames)
            # One row per (context, class): a per-context deep prompt repeats for each class.
            rows = [t.repeat_interleave(classes, dim=0) if t.dim() == 3 else t for t in deep]
            features = self.backbone.encode_prompts(
                self.assemble(batch), self.eot.repeat(count), rows, adapters
            ).view(count, classes, -1)
        return features[0] if single else features

    def anchor(self, kind: str = "paper") -> Tensor:
        """z_C: frozen features of the hand-crafted prompt, computed once per class list.

        ``paper`` is "a photo of a {class}."; ``official`` is the authors' code's placeholder
        prompt "X X .. X {class}." with M literal X tokens.
        """
        if kind not in self._anchors:
            if kind == "paper":
                texts = [HAND_CRAFTED.format(name) for name in self.classnames]
            else:
                texts = [" ".join(["X"] * self.n_ctx + [name]) + "." for name in self.classnames]
            with torch.no_grad():
                self._anchors[kind] = self.backbone.encode_texts(texts)
        return self._anchors[kind]

    def name_features(self) -> Tensor:
        """Frozen features (C x E) of the bare class names, no template: what FedTPG's
        generator is conditioned on. Computed once per class list."""
        if self._names is None:
            with torch.no_grad():
                self._names = self.backbone.encode_texts(list(self.classnames))
        return self._names
