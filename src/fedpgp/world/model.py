"""The world CLIP's own parts for pretraining: its compact vocabulary, a trainable model and
its weights file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..atomic import write_bytes_atomic
from ..backbone import bpe_tokenizer, create_model, tokenizer
from ..errors import BackboneError


def build_token_map(texts: list[str], vocab_size: int) -> Tensor:
    """A compact vocabulary for a model that reads only the words of ``texts``.

    Returns ``token_map`` (int64, one entry per open_clip BPE id): padding -> 0, the BPE ids
    used by ``texts`` -> 1, 2, ... in ascending BPE order, start-of-text -> ``vocab_size - 2``,
    end-of-text -> ``vocab_size - 1`` (the largest id, so open_clip's argmax pooling still finds
    it), every other id -> -1 (unknown; FrozenCLIP.tokenize rejects it).
    """
    bpe = bpe_tokenizer()
    words = sorted({i for text in texts for i in bpe.encode(text)})
    if len(words) + 3 > vocab_size:
        raise BackboneError(
            f"the texts use {len(words)} BPE tokens; with padding, start and end of text they "
            f"need vocab_size >= {len(words) + 3}, the model has {vocab_size}"
        )
    token_map = torch.full((bpe.vocab_size,), -1, dtype=torch.int64)
    token_map[0] = 0
    token_map[torch.tensor(words, dtype=torch.int64)] = torch.arange(1, len(words) + 1)
    token_map[bpe.sot_token_id] = vocab_size - 2
    token_map[bpe.eot_token_id] = vocab_size - 1
    return token_map


def tokenize_compact(name: str, texts: list[str], token_map: Tensor) -> Tensor:
    """Token ids (N, context length of ``name``) of ``texts`` in the compact vocabulary."""
    raw = tokenizer(name)(texts)
    ids = token_map[raw]
    if (ids < 0).any():
        bad = [text for text, row in zip(texts, ids, strict=False) if (row < 0).any()]
        raise BackboneError(f"the compact vocabulary has no token for a word in: {bad[:5]}")
    return ids


def create_trainable_clip(name: str, seed: int) -> nn.Module:
    """A randomly initialised open_clip model ``name`` (fp32, train mode), seeded by ``seed``."""
    return create_model(name, seed).train()


def save_clip_weights(
    model: nn.Module, path: Path, token_map: Tensor, metadata: dict[str, str] | None = None
) -> str:
    """Write the weights of ``model`` (fp16) and ``token_map`` to a safetensors file, atomically
    (a temporary file in the same folder, then a rename). Returns the file's sha256.

    ``metadata`` is stored as one JSON string under the key ``fedpgp``: safetensors writes
    several metadata keys in a random order, and equal weights must give equal files.
    """
    from safetensors.torch import save

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    state["token_map"] = token_map.to(torch.int64).contiguous()
    header = {"fedpgp": json.dumps(metadata or {}, sort_keys=True)}
    data = save(state, metadata=header)
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()
