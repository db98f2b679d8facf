"""What every method declares: its GLOBAL tensors (the server combines them), its PERSONAL
tensors (never leave the client), its local loss, the context it predicts with, and its server
role: what a client uploads, how the server combines uploads, and what else the server sends a
client. Both runtimes use these hooks and nothing else, so a method is written once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import RunConfig, method_label_space
from ..errors import ConfigError
from ..prompts import PromptBank, PromptTemplate
from ..seeding import torch_generator
from .registry import METHOD_NAMES, method_class

if TYPE_CHECKING:
    from ..backbone import FrozenCLIP
    from ..federation.update import Update

Tensors = dict[str, Tensor]

AGGREGATIONS = ("weighted", "mean")


def weighted_mean(updates: Sequence[Update], keys: Sequence[str]) -> Tensors:
    """sum_i (n_i / sum_j n_j) * tensor_i for each key (the FedAvg of docs/method.md section 3)."""
    total = sum(u.num_samples for u in updates)
    return {
        key: sum(u.tensors[key].double() * (u.num_samples / total) for u in updates).float()
        for key in keys
    }


def unweighted_mean(updates: Sequence[Update], keys: Sequence[str]) -> Tensors:
    """(1 / |S|) sum_i tensor_i for each key, whatever the clients' sample counts."""
    return {
        key: (sum(u.tensors[key].double() for u in updates) / len(updates)).float() for key in keys
    }


class Method:
    """A federated prompt-learning algorithm over a frozen CLIP."""

    name: ClassVar[str]
    global_keys: ClassVar[tuple[str, ...]] = ()
    personal_keys: ClassVar[tuple[str, ...]] = ()
    trains: ClassVar[bool] = True
    # The image features the method reads (fedpgp.experiment): "pooled" (N, E), "patches"
    # (N, P, E) or "stem", the tokens entering the image tower's first block (N, 1 + P, D_v).
    image_kind: ClassVar[str] = "pooled"
    # How the server combines uploads: "weighted" (by n_i) or "mean" (unweighted).
    aggregation: ClassVar[str] = "weighted"
    # Whether the server keeps every client's latest upload (for :meth:`server_sends`).
    keeps_uploads: ClassVar[bool] = False
    # Whether :meth:`batched_losses` holds, so that the clients of a round can train in
    # lockstep (``batch_clients``, fedpgp.federation.batched).
    can_batch: ClassVar[bool] = False
    # Whether the method classifies through its class features alone (its logits are
    # :meth:`logits` of :meth:`class_features`) and :meth:`batched_class_features` holds, so
    # that an evaluation encodes each class set once for all its clients.
    encodes_batched: ClassVar[bool] = False
    # The GLOBAL tensor that is a CoOp context (M x D) by itself, for a method with PERSONAL
    # tensors: its global prompt (:meth:`global_predictor`).
    global_context: ClassVar[str | None] = None
    # Rounds between evaluations when the config's ``eval_every`` is null; None: the final
    # round only (for a method whose evaluation encodes every test image per client).
    eval_every: ClassVar[int | None] = 1

    def __init__(
        self,
        cfg: RunConfig,
        logit_scale: float,
        embed_dim: int | None = None,
        backbone: FrozenCLIP | None = None,
    ) -> None:
        self.cfg = cfg
        self.logit_scale = logit_scale
        self._embed_dim = embed_dim
        self._backbone = backbone

    @property
    def backbone(self) -> FrozenCLIP:
        """The frozen CLIP, for methods that put prompts or adapters inside its encoders."""
        if self._backbone is None:
            raise ValueError(f"method {self.name} works inside the encoders: create it with one")
        return self._backbone

    @property
    def template(self) -> PromptTemplate:
        """How this method's prompt banks are built: CoOp's ``[SOS] ctx {name}.`` with the
        run's n_ctx by default."""
        return PromptTemplate(self.cfg.n_ctx)

    @property
    def embed_dim(self) -> int:
        """E, the width of image and class features, for methods whose tensors are sized by it
        (a meta-network on the image feature, a generator over class-name features)."""
        if self._embed_dim is None:
            raise ValueError(f"method {self.name} is sized by the embed dim: create it with one")
        return self._embed_dim

    @property
    def label_space(self) -> str:
        """Which classes a client trains over: the config's ``label_space``, unless the method
        sets its own in its section (FedTPG)."""
        return method_label_space(self.cfg, self.name)

    def init_global(self, width: int, generator: torch.Generator) -> Tensors:
        """The server's initial GLOBAL tensors."""
        return {}

    def init_personal(self, width: int, generator: torch.Generator) -> Tensors:
        """A client's initial PERSONAL tensors."""
        return {}

    def initial_global(self, width: int) -> Tensors:
        """The run's starting GLOBAL tensors (on the CPU), from the run seed: the server of
        either runtime starts from these."""
        return self.init_global(width, torch_generator(self.cfg.seed, "init", "global"))

    def initial_personal(self, width: int, client_id: int) -> Tensors:
        """Client ``client_id``'s starting PERSONAL tensors (on the CPU), from the run seed,
        the same on whichever machine the client runs."""
        generator = torch_generator(self.cfg.seed, "init", "client", client_id)
        return self.init_personal(width, generator)

    @classmethod
    def trained_keys(cls) -> list[str]:
        """What a client trains, in training order (GLOBAL, then PERSONAL): the parameters a
        kept optimizer's buffers are saved by."""
        return [*cls.global_keys, *cls.personal_keys]

    @property
    def upload_keys(self) -> tuple[str, ...]:
        """The names of everything that may leave a client: its GLOBAL tensors by default. An
        Update holding any other name is refused by the server, and the leak tests check that
        nothing else ever leaves."""
        return self.global_keys

    def upload(self, params: Mapping[str, Tensor], received: Mapping[str, Tensor]) -> Tensors:
        """What a client sends after local training, from its trained ``params`` and what it
        ``received`` this round: its GLOBAL tensors by default."""
        return {key: params[key] for key in self.upload_keys}

    def keep(self, params: Mapping[str, Tensor], received: Mapping[str, Tensor]) -> Tensors:
        """The PERSONAL state a client keeps after local training."""
        return {key: params[key] for key in self.personal_keys}

    def merge(self, params: Mapping[str, Tensor]) -> Tensors:
        """A client's tensors (its GLOBAL and PERSONAL ones, keys in that order) as it trains
        and predicts with them: unchanged by default; a method whose PERSONAL tensors take the
        GLOBAL ones into some of their slots writes them there (FedMGP)."""
        return dict(params)

    def after_training(
        self,
        params: Mapping[str, Tensor],
        received: Mapping[str, Tensor],
        generator: torch.Generator,
    ) -> Tensors:
        """The trained ``params`` completed with what a client decides after training, before
        :meth:`keep` and :meth:`upload` read them (FedMGP draws which groups to upload);
        ``generator`` is seeded by the run seed, the round and the client. Unchanged by
        default."""
        return dict(params)

    def combine(self, current: Mapping[str, Tensor], updates: Sequence[Update]) -> Tensors:
        """The server's new GLOBAL tensors from the sound ``updates`` of a round (at least one)."""
        mean = weighted_mean if self.aggregation == "weighted" else unweighted_mean
        return {**current, **mean(updates, self.global_keys)}

    def server_sends(self, client_id: int, round: int, stored: Mapping[int, Tensors]) -> Tensors:
        """What the server sends client ``client_id`` besides the GLOBAL tensors, from the
        uploads it keeps (``stored``, by client, when :attr:`keeps_uploads`): nothing by default.
        Such tensors reach the client read-only, in ``received``; they are never averaged."""
        return {}

    def prediction_context(self, params: Mapping[str, Tensor]) -> Tensor:
        """The context (M x D) this method classifies with: the CoOp context by default."""
        return params["ctx"]

    def class_features(self, params: Mapping[str, Tensor], bank: PromptBank) -> Tensor:
        """Normalised text features (C x E) of every class of ``bank``."""
        return bank.encode(self.prediction_context(params))

    def batched_class_features(self, params: Mapping[str, Tensor], bank: PromptBank) -> Tensor:
        """What :meth:`class_features` gives each of K clients, from their tensors stacked
        (K, ...), in one encoder call: (K, C, E). By default :meth:`class_features` itself, for
        a method whose class features take stacked tensors."""
        return self.class_features(params, bank)

    def encode_images(self, params: Mapping[str, Tensor], features: Tensor) -> Tensor:
        """What :meth:`logits` takes of the image features this method reads (its
        ``image_kind``): those features themselves by default; a method with prompts inside
        the image tower runs its stems through it."""
        return features

    def logits(self, features: Tensor, text_features: Tensor) -> Tensor:
        """exp(logit_scale) * cos(image, class) for a batch of image features."""
        return self.logit_scale * features @ text_features.t()

    def image_logits(
        self, params: Mapping[str, Tensor], bank: PromptBank, features: Tensor
    ) -> Tensor:
        """Logits (N, C) of a batch of the image features this method reads (its
        ``image_kind``)."""
        return self.logits(self.encode_images(params, features), self.class_features(params, bank))

    def predict(self, params: Mapping[str, Tensor], bank: PromptBank, features: Tensor) -> Tensor:
        """Predicted class index (into ``bank``) for each image feature (N x E, or V x N x E)."""
        return self.image_logits(params, bank, features).argmax(dim=-1)

    def global_predictor(self, global_tensors: Mapping[str, Tensor]) -> tuple[str, Tensors] | None:
        """How the GLOBAL tensors alone classify, as (method name, the tensors it predicts
        with), or None for a method without a global prompt. A method without PERSONAL tensors
        predicts with its GLOBAL ones; one with them, through its :attr:`global_context` used
        as a plain CoOp context (docs/using.md)."""
        if not self.personal_keys:
            return self.name, {key: global_tensors[key] for key in self.global_keys}
        if self.global_context is None:
            return None
        return "promptfl", {"ctx": global_tensors[self.global_context]}

    def loss(
        self,
        params: Mapping[str, Tensor],
        features: Tensor,
        labels: Tensor,
        bank: PromptBank,
        round_start: Mapping[str, Tensor],
    ) -> Tensor:
        """The local training loss of one batch. ``round_start`` holds what the client received
        this round: the GLOBAL tensors as the server sent them, and anything
        :meth:`server_sends` added."""
        return F.cross_entropy(self.image_logits(params, bank, features), labels)

    def batched_losses(
        self,
        params: Mapping[str, Tensor],
        features: Tensor,
        labels: Tensor,
        mask: Tensor,
        bank: PromptBank,
        round_start: Mapping[str, Tensor],
    ) -> Tensor:
        """The losses (K,) of K clients' batches at once, each equal to :meth:`loss` on that
        client's batch: ``params`` and ``round_start`` hold the clients' tensors stacked (K, ...),
        ``features`` (K, B, E) and ``labels`` (K, B) their batches padded to one length, ``mask``
        (K, B) which rows are real. This default is :meth:`loss`'s default, cross-entropy with
        the :meth:`prediction_context` (which must take stacked tensors) as the context; a
        method with another loss overrides it or leaves :attr:`can_batch` False."""
        text = self.batched_class_features(params, bank)
        logits = self.logit_scale * torch.einsum("kbe,kce->kbc", features, text)
        return masked_cross_entropy(logits, labels, mask)


def masked_cross_entropy(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean cross-entropy (K,) of logits (K, B, C) over the rows ``mask`` (K, B) keeps."""
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    kept = mask.to(losses.dtype)
    return (losses.view_as(kept) * kept).sum(dim=1) / kept.sum(dim=1)


def create_method(
    cfg: RunConfig,
    logit_scale: float,
    name: str | None = None,
    embed_dim: int | None = None,
    backbone: FrozenCLIP | None = None,
) -> Method:
    """The method the config names (or ``name``, with the config's settings), for a backbone
    of ``logit_scale`` and ``embed_dim`` (or ``backbone`` itself, which methods that work inside
    the encoders need)."""
    name = cfg.method if name is None else name
    if name not in METHOD_NAMES:
        raise ConfigError(f"method: expected one of {', '.join(METHOD_NAMES)}, got {name!r}")
    method = method_class(name)(cfg, logit_scale, embed_dim, backbone)
    if method.aggregation not in AGGREGATIONS:
        raise ConfigError(
            f"method {name}: aggregation {method.aggregation!r} is not one of {AGGREGATIONS}"
        )
    return method


def method_for(cfg: RunConfig, backbone: FrozenCLIP, name: str | None = None) -> Method:
    """The method the config names (or ``name``) on ``backbone``."""
    return create_method(cfg, backbone.logit_scale, name, backbone.embed_dim, backbone)
