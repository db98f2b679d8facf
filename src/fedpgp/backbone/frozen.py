"""FrozenCLIP: an open_clip CLIP with every parameter frozen, and the few operations prompt
learning needs: tokenize, token embedding, image encoding (pooled and patch features) and prompt
encoding from embeddings (truncated at the last EOT, since causal attention makes every later
position irrelevant to the EOT feature)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn
from torchvision import transforms as T

from ..errors import BackboneError
from .weights import available_models, load_weights, read_state_dict, resolve_tag, sha256_file


@dataclass(frozen=True)
class BackboneSpec:
    """Where a CLIP comes from: an open_clip name plus a pretrained tag, a weights file, or neither
    (random weights seeded by ``init_seed``, for tests and benchmarks)."""

    name: str = "fedpgp-world"
    pretrained: str | None = "world"
    file: str | None = None
    init_seed: int = 0
    allow_torchscript: bool = False


def _sha256_state(state: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs every step of model creation, and warns about random weights that are
    intended here (weights are loaded afterwards, or random on purpose)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def create_model(name: str, seed: int) -> nn.Module:
    """A randomly initialised open_clip model ``name`` (fp32), seeded by ``seed``."""
    if name not in available_models():
        raise BackboneError(
            f"backbone.name: unknown model '{name}'; known: "
            f"{', '.join(available_models()[:12])}, ... (open_clip.list_models())"
        )
    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None, load_weights=False)
    return model.float()


def bpe_tokenizer() -> open_clip.SimpleTokenizer:
    """open_clip's BPE tokenizer (the vocabulary of OpenAI's CLIP)."""
    return open_clip.SimpleTokenizer()


def tokenizer(name: str) -> Callable[..., Tensor]:
    """The tokenizer of model ``name``: texts -> token ids (N, context length)."""
    return open_clip.get_tokenizer(name)


def _text_tower(model: nn.Module) -> nn.Module:
    """open_clip keeps the text modules on the CLIP itself or on ``model.text``."""
    tower = getattr(model, "text", model)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    if not all(hasattr(tower, attr) for attr in needed):
        raise BackboneError(
            f"{type(model).__name__} has no CLIP-style text transformer; prompt learning needs one"
        )
    return tower


# Per-block adapters (pFedMMA): block index -> a function of the block's input and the block,
# whose result is added to the block's output. They act token by token.
Adapters = Mapping[int, Callable[[Tensor, nn.Module], Tensor]]


def check_adapters(adapters: Adapters, blocks: int, first: int = 0, tower: str = "text") -> None:
    """ValueError unless every adapter sits in one of blocks ``first`` .. ``blocks - 1``."""
    outside = sorted(index for index in adapters if not first <= index < blocks)
    if outside:
        raise ValueError(
            f"adapters in blocks {outside}, the {tower} tower runs blocks {first} .. {blocks - 1}"
        )


def run_block(block: nn.Module, x: Tensor, adapters: Adapters, index: int, **kwargs) -> Tensor:
    """``block(x)``, plus the adapter of block ``index`` applied to ``x`` where there is one."""
    out = block(x, **kwargs)
    adapter = adapters.get(index)
    return out if adapter is None else out + adapter(x, block)


def check_deep(deep: Sequence[Tensor], blocks: int, positions: int) -> None:
    """ValueError unless ``deep`` fits a text tower of ``blocks`` blocks whose prompts may
    replace at most ``positions`` positions after SOS."""
    if len(deep) >= blocks:
        raise ValueError(
            f"{len(deep)} deep text prompts need {len(deep) + 1} blocks, the text tower has "
            f"{blocks}"
        )
    for tokens in deep:
        if tokens.shape[-2] > positions:
            raise ValueError(
                f"a deep text prompt of {tokens.shape[-2]} tokens cannot replace more than the "
                f"{positions} context positions"
            )


class FrozenCLIP(nn.Module):
    """A CLIP with every parameter frozen, and the operations prompt learning needs."""

    def __init__(
        self,
        model: nn.Module,
        name: str,
        weights_digest: str,
        token_map: Tensor | None = None,
    ) -> None:
        super().__init__()
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        self.model = model
        self.name = name
        self.weights_digest = weights_digest
        self.text = _text_tower(model)
        if getattr(self.text, "text_pool_type", "argmax") not in ("argmax", "eos"):
            raise BackboneError(f"model '{name}' does not pool text at the EOT token")
        self.tokenizer = tokenizer(name)
        self.register_buffer("token_map", token_map, persistent=False)
        preprocess = model.visual.preprocess_cfg
        size = model.visual.image_size
        # A ViT keeps (height, width), open_clip's ResNet one int.
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
        # Set by the run (config key ``precision``): bf16 autocast of the frozen encoders on CUDA.
        self.autocast_dtype: torch.dtype | None = None

    @classmethod
    def load(cls, spec: BackboneSpec) -> FrozenCLIP:
        """Build the CLIP that ``spec`` names; every failure is a :class:`BackboneError`."""
        if spec.name not in available_models():
            raise BackboneError(
                f"backbone.name: unknown model '{spec.name}'; known: "
                f"{', '.join(available_models()[:12])}, ... (open_clip.list_models())"
            )
        path: Path | None = None
        if spec.file:
            path = Path(spec.file).expanduser()
        elif spec.pretrained:
            path = resolve_tag(spec.name, spec.pretrained)
        model = create_model(spec.name, spec.init_seed)
        token_map = None
        if path is None:
            digest = f"random-{_sha256_state(model.state_dict())[:16]}"
        else:
            state = read_state_dict(path, spec.allow_torchscript)
            token_map = state.pop("token_map", None)
            load_weights(model, state, path, spec.name)
            digest = sha256_file(path)[:16]
        return cls(model.float(), spec.name, digest, token_map)

    @property
    def identity(self) -> str:
        """Model name plus a hash of its weights: the key for anything derived from them."""
        return f"{self.name}@{self.weights_digest}"

    @property
    def text_width(self) -> int:
        return int(self.text.token_embedding.weight.shape[1])

    @property
    def embed_dim(self) -> int:
        projection = self.text.text_projection
        return int(
            projection.shape[1] if isinstance(projection, Tensor) else projection.out_features
        )

    @property
    def context_length(self) -> int:
        return int(self.text.positional_embedding.shape[0])

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @property
    def device(self) -> torch.device:
        return self.text.positional_embedding.device

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids (N, context_length) and the EOT position of each text."""
        raw = self.tokenizer(texts, context_length=self.context_length)
        eot = raw.argmax(dim=-1)
        if self.token_map is None:
            return raw, eot
        ids = self.token_map[raw]
        if (ids < 0).any():
            bad = [text for text, row in zip(texts, ids, strict=False) if (row < 0).any()]
            raise BackboneError(f"model '{self.name}' has no token for a word in: {bad[:5]}")
        return ids, eot

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """Token embeddings (N, L, D), without positions."""
        return self.text.token_embedding(ids.to(self.device))

    def encode_prompts(
        self,
        embeddings: Tensor,
        eot_index: Tensor,
        deep: Sequence[Tensor] = (),
        adapters: Adapters | None = None,
    ) -> Tensor:
        """L2-normalised text features of prompt embeddings (N, L, D).

        Runs the transformer only over positions up to the last EOT in the batch: attention is
        causal, so later positions cannot change any EOT feature. ``deep[i - 1]`` (M, D), or
        (N, M, D) for one per prompt, replaces the hidden states of positions 1 .. M before
        block i (deep text prompts); ``adapters`` add their term to the output of their block.
        """
        adapters = adapters or {}
        length = int(eot_index.max()) + 1
        with self.autocast():
            x = embeddings[:, :length] + self.text.positional_embedding[:length]
            mask = self.text.attn_mask
            mask = None if mask is None else mask[:length, :length]
            if deep or adapters:
                blocks = self.text.transformer.resblocks
                check_deep(deep, len(blocks), length - 1)
                check_adapters(adapters, len(blocks))
                if not getattr(self.text.transformer, "batch_first", False):
                    raise BackboneError(
                        f"model '{self.name}': prompts or adapters inside the text tower need a "
                        f"batch-first text tower"
                    )
                for index, block in enumerate(blocks):
                    if 0 < index <= len(deep):
                        tokens = deep[index - 1]
                        tokens = tokens.expand(x.shape[0], -1, -1) if tokens.dim() == 2 else tokens
                        tokens = tokens.to(x.dtype)
                        x = torch.cat([x[:, :1], tokens, x[:, 1 + tokens.shape[1] :]], dim=1)
                    x = run_block(block, x, adapters, index, attn_mask=mask)
            else:
                x = self.text.transformer(x, attn_mask=mask)
            x = self.text.ln_final(x)
            x = x[torch.arange(x.shape[0], device=x.device), eot_index.to(x.device)]
            projection = self.text.text_projection
            if projection is not None:
                x = projection(x) if isinstance(projection, nn.Module) else x @ projection
        return F.normalize(x.float(), dim=-1)

    def encode_texts(self, texts: list[str]) -> Tensor:
        """L2-normalised features of plain texts, e.g. hand-crafted prompts."""
        ids, eot = self.tokenize(texts)
        return self.encode_prompts(self.embed_tokens(ids), eot)

    def encode_images(self, images: Tensor) -> Tensor:
        """L2-normalised image features of a batch of transformed images (N, 3, H, W)."""
        with self.autocast():
            features = self.model.encode_image(images.to(self.device))
        return F.normalize(features.float(), dim=-1)

    def encode_images_with_patches(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """L2-normalised pooled features (N, E) and patch features (N, P, E) of one image pass.

        The patch tokens of the last block go through ``ln_post`` and the projection like the
        pooled token, as FedOTP's code does; the pooled feature equals :meth:`encode_images`.
        """
        visual = self.model.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise BackboneError(
                f"model '{self.name}' has no ViT image tower with a class token, so it has no "
                f"patch features (FedOTP needs them)"
            )
        with self.autocast():
            out = visual.forward_intermediates(
                images.to(self.device), indices=1, normalize_intermediates=True, output_fmt="NLC"
            )
            patches = out["image_intermediates"][0]
            if visual.proj is not None:
                patches = patches @ visual.proj
        pooled = F.normalize(out["image_features"].float(), dim=-1)
        return pooled, F.normalize(patches.float(), dim=-1)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast of the frozen encoders to ``autocast_dtype`` on CUDA; prompt parameters and
        the loss stay fp32. A no-op on the CPU or when ``autocast_dtype`` is None."""
        if self.autocast_dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    def test_transform(self) -> T.Compose:
        """Resize the short side, center crop, normalise (docs/method.md section 4)."""
        return T.Compose(
            [
                T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(self.image_size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def train_transform(self) -> T.Compose:
        """Random resized crop (scale 0.08-1, bicubic) and horizontal flip (docs/method.md
        section 4)."""
        return T.Compose(
            [
                T.RandomResizedCrop(
                    self.image_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC
                ),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )
