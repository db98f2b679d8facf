"""pFedMoAP (Luo et al., ICLR 2025): a client mixes its own CoOp prompt with other clients'
prompts ("experts") through a PERSONAL attention gating on the image feature
(docs/method.md section 12).

With f = f(x) the image feature (E wide), s = exp(logit_scale), d = min(gating_dim, E) and
pi(x) = x[..., ::E/d] (strided sub-sampling, not pooling):

    t_c   = Enc(ctx, c)                       (the client's prompt, trained)
    t^j_c = Enc(ctx_j, c)                     (expert j's prompt, frozen)
    q     = pi(f);   K_c = V_c = [pi(t_c); pi(t^1_c); ...]           (1 + J rows of width d)
    a_h   = softmax_j( kappa (W_q q + b_q)_h . (W_k K_c + b_k)_h^T )     (each head h)
    o_c   = W_o concat_h( a_h (W_v V_c + b_v)_h ) + b_o
    logit_c = lambda s f . t_c + s pi(f) . o_c

and logit_c = s f . t_c (plain CoOp) when the client has no experts; the loss is the
cross-entropy. lambda = ``pfedmoap.local_weight``, kappa = ``pfedmoap.scaling`` (the authors'
scaling, not 1/sqrt(d_k)). The run's one SGD optimizer trains ctx and the gating together; the
authors' code has two (gating: lr 0.01, constant; prompt: lr 0.002, cosine).

The server averages ``ctx`` (n_i-weighted), keeps every client's latest upload and sends a
client the num_experts - 1 others nearest to its own, as ``expert/<client id>``. The client
keeps its trained prompt (``ctx_local``), its gating and the experts of its last training
round, and predicts with those three.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import RunConfig
from ..errors import ConfigError
from ..prompts import PromptBank, linear_init, normal_init
from ..seeding import torch_generator
from .base import Method, Tensors

if TYPE_CHECKING:
    from ..backbone import FrozenCLIP

EXPERT = "expert/"
GATING = ("gate_wq", "gate_bq", "gate_wk", "gate_bk", "gate_wv", "gate_bv", "gate_wo", "gate_bo")
# Images scored in one call at prediction: bounds the (images x classes x d) attention output.
PREDICT_CHUNK = 256


def expert_id(name: str) -> int:
    """The client id in an ``expert/<client id>`` name; ValueError for any other name."""
    suffix = name[len(EXPERT) :]
    if not suffix.isdigit() or str(int(suffix)) != suffix:
        raise ValueError(f"received tensor {name!r}: expected a name {EXPERT}<client id>")
    return int(suffix)


def received_experts(received: Mapping[str, Tensor], like: Tensor, limit: int) -> list[Tensor]:
    """The experts in ``received``, by client id, each checked to be a finite prompt of the
    shape and dtype of ``like``: a bad one raises ValueError naming it, so a client never
    trains on what a faulty server sent."""
    named = sorted(
        ((expert_id(k), k, v) for k, v in received.items() if k.startswith(EXPERT)),
        key=lambda item: item[0],
    )
    if len(named) > limit:
        raise ValueError(
            f"received {len(named)} experts, expected at most num_experts - 1 = {limit}"
        )
    for _, name, value in named:
        if not isinstance(value, Tensor) or value.shape != like.shape:
            shape = tuple(getattr(value, "shape", ()))
            raise ValueError(
                f"received expert {name!r} has shape {shape}, expected {tuple(like.shape)} "
                f"(n_ctx x width)"
            )
        if value.dtype != like.dtype:
            raise ValueError(
                f"received expert {name!r} has dtype {value.dtype}, expected {like.dtype}"
            )
        if not torch.isfinite(value).all():
            raise ValueError(f"received expert {name!r} has non-finite values, expected finite")
    return [value for _, _, value in named]


class PFedMoAP(Method):
    name = "pfedmoap"
    global_keys = ("ctx",)
    personal_keys = (*GATING, "ctx_local", "experts", "expert_mask")
    global_context = "ctx"
    keeps_uploads = True

    def __init__(
        self,
        cfg: RunConfig,
        logit_scale: float,
        embed_dim: int | None = None,
        backbone: FrozenCLIP | None = None,
    ) -> None:
        super().__init__(cfg, logit_scale, embed_dim, backbone)
        # (bank, received expert tensors, their features) of the round being trained.
        self._cache: tuple[PromptBank, list[Tensor], Tensor] | None = None
        if embed_dim is not None:
            # A gating that cannot sub-sample E fails when the experiment is built.
            self.gating_width()

    @property
    def num_experts(self) -> int:
        """Prompts a client mixes, its own included: ``pfedmoap.num_experts``, or the authors'
        min(10, num_clients)."""
        chosen = self.cfg.pfedmoap.num_experts
        return min(10, self.cfg.num_clients) if chosen is None else chosen

    def gating_width(self) -> int:
        """d = min(gating_dim, E), which must divide E (pi takes every E/d-th entry) and be
        divisible by gating_heads; ConfigError naming the key otherwise."""
        settings, embed = self.cfg.pfedmoap, self.embed_dim
        width = min(settings.gating_dim, embed)
        if embed % width:
            raise ConfigError(
                f"pfedmoap.gating_dim: expected a divisor of the embed dim {embed} (or at "
                f"least {embed}), got {settings.gating_dim}"
            )
        if width % settings.gating_heads:
            raise ConfigError(
                f"pfedmoap.gating_heads: expected a divisor of the gating width {width}, got "
                f"{settings.gating_heads}"
            )
        return width

    def init_global(self, width: int, generator: torch.Generator) -> Tensors:
        return {"ctx": normal_init((self.cfg.n_ctx, width), generator)}

    def init_personal(self, width: int, generator: torch.Generator) -> Tensors:
        """The gating from ``generator``; ``ctx_local`` is the run's initial GLOBAL ctx, so an
        untrained client predicts as CoOp from the initial context; no experts yet."""
        gating_width = self.gating_width()
        gating: Tensors = {}
        for weight, bias in zip(GATING[::2], GATING[1::2], strict=True):
            gating[weight], gating[bias] = linear_init(gating_width, gating_width, generator)
        slots = self.num_experts - 1
        return {
            **gating,
            "ctx_local": self.initial_global(width)["ctx"],
            "experts": torch.zeros(slots, self.cfg.n_ctx, width),
            "expert_mask": torch.zeros(slots),
        }

    def initial_personal(self, width: int, client_id: int) -> Tensors:
        """The same starting gating for every client (the authors' code hands each client the
        previous client's trained gating in round 1, which is not copied)."""
        return self.init_personal(width, torch_generator(self.cfg.seed, "init", "moap-gating"))

    def server_sends(self, client_id: int, round: int, stored: Mapping[int, Tensors]) -> Tensors:
        """The latest uploads of at most num_experts - 1 other clients, exactly as they were
        sent: all of them when there are no more, else the nearest in L2 to the client's own
        kept upload, ties to the lower id. A client with no kept upload (none of its updates
        was usable yet) is matched against the unweighted mean of the others' kept uploads,
        a stand-in for the global prompt it starts from."""
        others = {cid: upload["ctx"] for cid, upload in stored.items() if cid != client_id}
        chosen = sorted(others)
        limit = self.num_experts - 1
        if len(chosen) > limit:
            own = stored.get(client_id)
            if own is not None:
                centre = own["ctx"].double()
            else:
                centre = torch.stack([others[cid].double() for cid in chosen]).mean(dim=0)
            distance = {cid: float((others[cid].double() - centre).norm()) for cid in chosen}
            chosen = sorted(sorted(chosen, key=lambda cid: (distance[cid], cid))[:limit])
        return {f"{EXPERT}{cid}": others[cid] for cid in chosen}

    def _expert_features(
        self, received: Mapping[str, Tensor], like: Tensor, bank: PromptBank
    ) -> Tensor:
        """(J, C, E) frozen features of the received experts on ``bank``, encoded once per
        round and bank rather than once per step. The cache holds the bank and the expert
        tensors themselves, so a hit means the very same objects (ids are never reused while
        they are held)."""
        values = [v for k, v in received.items() if k.startswith(EXPERT)]
        cached = self._cache
        if (
            cached is not None
            and cached[0] is bank
            and len(cached[1]) == len(values)
            and all(a is b for a, b in zip(cached[1], values, strict=True))
        ):
            return cached[2]
        experts = received_experts(received, like, self.num_experts - 1)
        with torch.no_grad():
            features = bank.encode(torch.stack(experts)) if experts else like.new_zeros(0)
        self._cache = (bank, values, features)
        return features

    def gated_logits(
        self, params: Mapping[str, Tensor], features: Tensor, own: Tensor, experts: Tensor
    ) -> Tensor:
        """Logits (B, C) of image features (B, E) from the client's class features ``own``
        (C, E) and the experts' ``experts`` (J, C, E); CoOp's when J is 0."""
        local = self.logit_scale * features @ own.t()
        if experts.shape[0] == 0:
            return local
        settings = self.cfg.pfedmoap
        stride = self.embed_dim // self.gating_width()
        heads = settings.gating_heads
        query_in = features[..., ::stride]
        # The client's own prompt is a key/value row too: gradients reach ctx through it.
        rows = torch.cat([own.unsqueeze(0), experts])[..., ::stride]
        query = F.linear(query_in, params["gate_wq"], params["gate_bq"]).unflatten(-1, (heads, -1))
        key = F.linear(rows, params["gate_wk"], params["gate_bk"]).unflatten(-1, (heads, -1))
        value = F.linear(rows, params["gate_wv"], params["gate_bv"]).unflatten(-1, (heads, -1))
        scores = settings.scaling * torch.einsum("bhk,jchk->bchj", query, key)
        mixed = torch.einsum("bchj,jchk->bchk", scores.softmax(dim=-1), value).flatten(-2)
        out = F.linear(mixed, params["gate_wo"], params["gate_bo"])
        gated = self.logit_scale * torch.einsum("bd,bcd->bc", query_in, out)
        return settings.local_weight * local + gated

    def loss(
        self,
        params: Mapping[str, Tensor],
        features: Tensor,
        labels: Tensor,
        bank: PromptBank,
        round_start: Mapping[str, Tensor],
    ) -> Tensor:
        """CE of the gated logits: the client's prompt with grad, the received experts frozen."""
        experts = self._expert_features(round_start, params["ctx"], bank)
        own = bank.encode(params["ctx"])
        return F.cross_entropy(self.gated_logits(params, features, own, experts), labels)

    def keep(self, params: Mapping[str, Tensor], received: Mapping[str, Tensor]) -> Tensors:
        """The trained gating, the trained prompt as ``ctx_local``, and this round's experts
        in the fixed (num_experts - 1) slots, a filled slot marked 1.0 in ``expert_mask``."""
        ctx = params["ctx"]
        limit = self.num_experts - 1
        experts = received_experts(received, ctx, limit)
        slots = ctx.new_zeros(limit, *ctx.shape)
        mask = ctx.new_zeros(limit)
        if experts:
            slots[: len(experts)] = torch.stack(experts).to(ctx.device)
            mask[: len(experts)] = 1.0
        gating = {key: params[key] for key in GATING}
        return {**gating, "ctx_local": ctx, "experts": slots, "expert_mask": mask}

    def image_logits(
        self, params: Mapping[str, Tensor], bank: PromptBank, features: Tensor
    ) -> Tensor:
        """Prediction logits (B, C): ``ctx_local``, the gating and the kept experts, a slot
        whose mask is 0 left out altogether."""
        kept = params["experts"][params["expert_mask"] > 0.5]
        encoded = bank.encode(torch.cat([params["ctx_local"].unsqueeze(0), kept]))
        return torch.cat(
            [
                self.gated_logits(params, chunk, encoded[0], encoded[1:])
                for chunk in features.split(PREDICT_CHUNK)
            ]
        )

    def predict(self, params: Mapping[str, Tensor], bank: PromptBank, features: Tensor) -> Tensor:
        """Per-image gating, which class features alone cannot express: (N, E) or (V, N, E)."""
        flat = features.reshape(-1, features.shape[-1])
        return self.image_logits(params, bank, flat).argmax(dim=-1).reshape(features.shape[:-1])
