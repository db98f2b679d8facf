"""The frozen CLIP: the only package that knows open_clip. ``weights`` finds and reads weights,
``frozen`` is :class:`FrozenCLIP`, ``text`` the prefix-shared text encoder, ``prompted`` the
image tower with learnable tokens inside it."""

from .frozen import BackboneSpec, FrozenCLIP, bpe_tokenizer, create_model, tokenizer
from .weights import PACKAGE_WEIGHTS, available_models, read_state_dict

__all__ = [
    "PACKAGE_WEIGHTS",
    "BackboneSpec",
    "FrozenCLIP",
    "available_models",
    "bpe_tokenizer",
    "create_model",
    "read_state_dict",
    "tokenizer",
]
