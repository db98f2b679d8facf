"""Prompt encoding that computes only what can differ between classes.

Every prompt of a bank is ``[SOS] ctx_1 .. ctx_M`` followed by a class's suffix
``<name tokens> . [EOT]``. The text transformer is causal, so in every layer the hidden states of
the shared prefix are the same for all classes: they are computed once per context, and each
class's suffix attends to that prefix's keys and values. Each suffix stops at its own EOT (classes
are grouped by suffix length, so no class pays for a longer name). The result equals the plain
full-length computation up to float rounding; only the number of positions computed changes:
``P * (1 + M) + P * sum_c len(suffix_c)`` instead of ``P * C * 77``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .frozen import Adapters, FrozenCLIP

_BLOCK_PARTS = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")


def shared_prefix_supported(backbone: FrozenCLIP) -> bool:
    """True when the text tower is a causal stack of standard CLIP residual attention blocks
    (pre-norm, one ``nn.MultiheadAttention`` with packed q/k/v), which this encoder replays."""
    text = backbone.text
    mask = getattr(text, "attn_mask", None)
    if mask is None or getattr(text, "cls_emb", None) is not None:
        return False
    length = mask.shape[0]
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=mask.device), 1)
    if mask.dtype == torch.bool:
        masked = mask
    else:
        masked = torch.isinf(mask) & (mask < 0)
        if (mask[~masked] != 0).any():
            return False
    if not torch.equal(masked, causal):
        return False
    for block in text.transformer.resblocks:
        if not all(hasattr(block, part) for part in _BLOCK_PARTS) or hasattr(block, "ln_1_kv"):
            return False
        attn = block.attn
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            return False
        if attn.bias_k is not None or attn.add_zero_attn:
            return False
    return True


@dataclass(frozen=True)
class _Group:
    """Classes whose suffix has the same number of tokens (up to and including EOT)."""

    classes: Tensor  # (C_g,) class indices into the bank
    tokens: Tensor  # (C_g, L_g, D) suffix embeddings with their positional embeddings added

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def count(self) -> int:
        return int(self.tokens.shape[0])


class SharedPrefixEncoder:
    """Normalised text features of ``[prefix_p][suffix_c]`` for P prefixes and C class suffixes.

    ``suffixes`` (C, L, D) are token embeddings without positions, ``lengths`` (C,) the number of
    suffix tokens up to and including each class's EOT, ``prefix_length`` the number of prefix
    tokens (SOS plus the context) that precede every suffix.
    """

    def __init__(
        self, backbone: FrozenCLIP, suffixes: Tensor, lengths: Tensor, prefix_length: int
    ) -> None:
        self.backbone = backbone
        self.prefix_length = prefix_length
        text = backbone.text
        self.blocks = list(text.transformer.resblocks)
        positions = text.positional_embedding
        groups = []
        for length in sorted({int(n) for n in lengths.tolist()}):
            classes = torch.nonzero(lengths == length).flatten()
            start = prefix_length
            tokens = (
                suffixes[classes.to(suffixes.device), :length] + positions[start : start + length]
            )
            groups.append(_Group(classes.to(positions.device), tokens.detach()))
        self.groups = groups
        order = torch.cat([g.classes for g in groups])
        # Features come out grouped by suffix length; ``restore`` puts them back in class order.
        self.restore = torch.argsort(order)
        self.num_classes = int(lengths.shape[0])
        self._eot_rows: dict[int, Tensor] = {}
        self._masks: dict[tuple[int, torch.dtype], Tensor] = {}

    def _eot_index(self, count: int) -> Tensor:
        """Rows of the flat token matrix that hold each (prefix, class) EOT, in the order
        (prefix, group, class within group); cached per number of prefixes."""
        if count not in self._eot_rows:
            rows, offset = [], count * self.prefix_length
            for group in self.groups:
                ends = torch.arange(count * group.count) * group.length + group.length - 1
                rows.append((offset + ends).view(count, group.count))
                offset += count * group.count * group.length
            index = torch.cat(rows, dim=1).flatten()
            self._eot_rows[count] = index.to(self.backbone.device)
        return self._eot_rows[count]

    def encode(
        self, prefixes: Tensor, deep: Sequence[Tensor] = (), adapters: Adapters | None = None
    ) -> Tensor:
        """Features (P, C, E) of every prefix (P, prefix_length, D) with every class suffix.
        ``deep[i - 1]`` (M, D), or (P, M, D) for one per prefix, replaces the hidden states of
        prefix positions 1 .. M before block i: deep prompts, which stay prefix rows, so the
        prefix is still shared by every class. ``adapters`` add their term to their block's
        output; they act token by token, so they keep the sharing too. The caller checks
        ``deep`` and ``adapters`` (:func:`~fedpgp.backbone.frozen.check_deep`,
        :func:`~fedpgp.backbone.frozen.check_adapters`, as PromptBank.encode does)."""
        adapters = adapters or {}
        count, length, width = prefixes.shape
        if length != self.prefix_length:
            raise ValueError(f"expected prefixes of {self.prefix_length} tokens, got {length}")
        text = self.backbone.text
        with self.backbone.autocast():
            pieces = [(prefixes + text.positional_embedding[:length]).reshape(-1, width)]
            pieces += [g.tokens.expand(count, -1, -1, -1).reshape(-1, width) for g in self.groups]
            rows = torch.cat(pieces)
            for index, block in enumerate(self.blocks):
                if 0 < index <= len(deep):
                    rows = self._replace_prefix(rows, deep[index - 1], count)
                adapter = adapters.get(index)
                out = self._block(block, rows, count)
                rows = out if adapter is None else out + adapter(rows, block)
            x = text.ln_final(rows[self._eot_index(count)])
            projection = text.text_projection
            if projection is not None:
                x = projection(x) if isinstance(projection, nn.Module) else x @ projection
        x = x.float().view(count, self.num_classes, -1)[:, self.restore]
        return F.normalize(x, dim=-1)

    def _replace_prefix(self, rows: Tensor, tokens: Tensor, count: int) -> Tensor:
        """``rows`` with prefix positions 1 .. M of every prefix replaced by ``tokens``."""
        split = count * self.prefix_length
        prefix = rows[:split].view(count, self.prefix_length, -1)
        tokens = tokens.expand(count, -1, -1) if tokens.dim() == 2 else tokens
        length = tokens.shape[1]
        prefix = torch.cat([prefix[:, :1], tokens.to(rows.dtype), prefix[:, 1 + length :]], dim=1)
        return torch.cat([prefix.reshape(split, -1), rows[split:]])

    def _block(self, block: nn.Module, rows: Tensor, count: int) -> Tensor:
        """One residual attention block over the flat token matrix (prefix rows first)."""
        attn: nn.MultiheadAttention = block.attn
        heads, width = attn.num_heads, rows.shape[-1]
        qkv = F.linear(block.ln_1(rows), attn.in_proj_weight, attn.in_proj_bias)
        sizes = [count * self.prefix_length] + [count * g.count * g.length for g in self.groups]
        chunks = qkv.split(sizes)
        # (P, Lp, 3, H, d) -> queries, keys, values of the prefix, each (P, H, Lp, d)
        q, k_prefix, v_prefix = (
            chunks[0].view(count, self.prefix_length, 3, heads, -1).permute(2, 0, 3, 1, 4)
        )
        outputs = [
            F.scaled_dot_product_attention(q, k_prefix, v_prefix, is_causal=True)
            .transpose(1, 2)
            .reshape(-1, width)
        ]
        for group, chunk in zip(self.groups, chunks[1:], strict=True):
            q, k, v = chunk.view(count, group.count, group.length, 3, heads, -1).unbind(3)
            outputs.append(self._suffix_attention(q, k, v, k_prefix, v_prefix).reshape(-1, width))
        rows = rows + block.ls_1(attn.out_proj(torch.cat(outputs)))
        return rows + block.ls_2(block.mlp(block.ln_2(rows)))

    def _suffix_attention(
        self, q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor
    ) -> Tensor:
        """Attention of suffix tokens (P, C, L, H, d) to the shared prefix (P, H, Lp, d), which is
        never copied per class, and causally to their own suffix."""
        length = q.shape[2]
        q = q * q.shape[-1] ** -0.5
        to_prefix = torch.einsum("pclhd,phkd->pchlk", q, k_prefix)
        to_suffix = torch.einsum("pclhd,pckhd->pchlk", q, k) + self._causal(length, q)
        weights = torch.cat([to_prefix, to_suffix], dim=-1).softmax(dim=-1)
        w_prefix, w_suffix = weights.split([self.prefix_length, length], dim=-1)
        return torch.einsum("pchlk,phkd->pclhd", w_prefix, v_prefix) + torch.einsum(
            "pchlk,pckhd->pclhd", w_suffix, v
        )

    def _causal(self, length: int, like: Tensor) -> Tensor:
        """Additive causal mask (L, L): -inf above the diagonal, cached per length and dtype."""
        key = (length, like.dtype)
        if key not in self._masks:
            full = torch.full((length, length), float("-inf"), device=like.device)
            self._masks[key] = full.triu(1).to(like.dtype)
        return self._masks[key]
