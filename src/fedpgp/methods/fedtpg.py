"""FedTPG (Qiu et al., ICLR 2024): a GLOBAL prompt generator conditioned on the class names, so
that the context is made for whichever class list is classified (docs/method.md section 10).

    T      = Enc_text(name_c) for every class of the bank            (C x E, frozen)
    A      = MHA(LN_q(P), LN_kv(T), LN_kv(T))                        (M x D, no residual)
    ctx    = A + W2 GEGLU(W1 LN_f(A) + b1) + b2                      (GEGLU(u, g) = u gelu(g))
    logit(x, c) = exp(logit_scale) f(x) . Enc(ctx, c)

P (M x D) are learnable queries; the attention has ``fedtpg.heads`` heads, queries of width D
and keys and values from the E-wide name features. Every tensor is GLOBAL; the authors train
each client over its own classes and average unweighted (the section's defaults).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..prompts import PromptBank, linear_init, normal_init, xavier_uniform
from .base import Method, Tensors

# The feed-forward block's inner width, as a multiple of D (the authors' 2048 for D = 512).
FF_MULT = 4


def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """F.linear that also takes K clients' stacked weights (K, out, in) and biases (K, out)."""
    return x @ weight.transpose(-1, -2) + bias.unsqueeze(-2)


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """F.layer_norm over the last dimension, with stacked affine parameters allowed (K, width)."""
    return F.layer_norm(x, (x.shape[-1],)) * weight.unsqueeze(-2) + bias.unsqueeze(-2)


def generate_context(params: Mapping[str, Tensor], names: Tensor, heads: int) -> Tensor:
    """The generator's context (M x D) for class-name features ``names`` (C x E); K clients'
    stacked tensors give their K contexts (K, M, D) in the same products."""
    query = _layer_norm(params["tpg_prompt"], params["tpg_ln_q_w"], params["tpg_ln_q_b"])
    keys = _layer_norm(names, params["tpg_ln_kv_w"], params["tpg_ln_kv_b"])
    q = _linear(query, params["tpg_q_w"], params["tpg_q_b"])
    k = _linear(keys, params["tpg_k_w"], params["tpg_k_b"])
    v = _linear(keys, params["tpg_v_w"], params["tpg_v_b"])
    # (..., heads, tokens, width / heads): each head attends over the classes on its own slice.
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(-3, -2) for t in (q, k, v))
    attended = F.scaled_dot_product_attention(q, k, v).transpose(-3, -2).flatten(-2)
    attended = _linear(attended, params["tpg_out_w"], params["tpg_out_b"])
    hidden = _layer_norm(attended, params["tpg_ln_f_w"], params["tpg_ln_f_b"])
    value, gate = _linear(hidden, params["tpg_ff1_w"], params["tpg_ff1_b"]).chunk(2, dim=-1)
    return attended + _linear(value * F.gelu(gate), params["tpg_ff2_w"], params["tpg_ff2_b"])


class FedTPG(Method):
    name = "fedtpg"
    global_keys = (
        "tpg_prompt",
        "tpg_ln_q_w",
        "tpg_ln_q_b",
        "tpg_ln_kv_w",
        "tpg_ln_kv_b",
        "tpg_q_w",
        "tpg_q_b",
        "tpg_k_w",
        "tpg_k_b",
        "tpg_v_w",
        "tpg_v_b",
        "tpg_out_w",
        "tpg_out_b",
        "tpg_ln_f_w",
        "tpg_ln_f_b",
        "tpg_ff1_w",
        "tpg_ff1_b",
        "tpg_ff2_w",
        "tpg_ff2_b",
    )

    can_batch = True
    encodes_batched = True

    @property
    def aggregation(self) -> str:  # type: ignore[override]
        return self.cfg.fedtpg.aggregation

    def init_global(self, width: int, generator: torch.Generator) -> Tensors:
        """P ~ N(0, 0.02^2) and PyTorch's default initialisation of the authors' modules:
        LayerNorms at (1, 0), nn.MultiheadAttention's Xavier projections (one packed 3D x D
        matrix when keys are D wide) with zero biases, and nn.Linear's uniform elsewhere."""
        heads, embed = self.cfg.fedtpg.heads, self.embed_dim
        if width % heads:
            raise ConfigError(
                f"fedtpg.heads: expected a divisor of the text width {width}, got {heads}"
            )
        if embed == width:
            packed = xavier_uniform((3 * width, width), generator)
            q_w, k_w, v_w = packed.chunk(3)
        else:
            q_w = xavier_uniform((width, width), generator)
            k_w = xavier_uniform((width, embed), generator)
            v_w = xavier_uniform((width, embed), generator)
        out_w, _ = linear_init(width, width, generator)
        inner = FF_MULT * width
        ff1_w, ff1_b = linear_init(2 * inner, width, generator)
        ff2_w, ff2_b = linear_init(width, inner, generator)
        zeros = torch.zeros(width)
        return {
            "tpg_prompt": normal_init((self.cfg.n_ctx, width), generator),
            "tpg_ln_q_w": torch.ones(width),
            "tpg_ln_q_b": zeros.clone(),
            "tpg_ln_kv_w": torch.ones(embed),
            "tpg_ln_kv_b": torch.zeros(embed),
            "tpg_q_w": q_w.contiguous(),
            "tpg_q_b": zeros.clone(),
            "tpg_k_w": k_w.contiguous(),
            "tpg_k_b": zeros.clone(),
            "tpg_v_w": v_w.contiguous(),
            "tpg_v_b": zeros.clone(),
            "tpg_out_w": out_w,
            "tpg_out_b": zeros.clone(),
            "tpg_ln_f_w": torch.ones(width),
            "tpg_ln_f_b": zeros.clone(),
            "tpg_ff1_w": ff1_w,
            "tpg_ff1_b": ff1_b,
            "tpg_ff2_w": ff2_w,
            "tpg_ff2_b": ff2_b,
        }

    def class_features(self, params: Mapping[str, Tensor], bank: PromptBank) -> Tensor:
        """Enc(ctx, c) with the context generated from this bank's own class names; K clients'
        stacked tensors give their (K, C, E) in one encoder call."""
        return bank.encode(generate_context(params, bank.name_features(), self.cfg.fedtpg.heads))
