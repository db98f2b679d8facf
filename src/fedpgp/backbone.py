"""FrozenCLIP: the only module that knows open_clip.

It loads a CLIP by open_clip model name and pretrained tag, from an OpenAI ``.pt`` file, from an
open_clip checkpoint, or from an architecture shipped with the package; freezes it; and exposes
the few operations prompt learning needs: tokenize, token embedding, image encoding and prompt
encoding from embeddings (truncated at the last EOT, since causal attention makes every later
position irrelevant to the EOT feature).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn
from torchvision import transforms as T

from .atomic import write_bytes_atomic
from .errors import BackboneError

log = logging.getLogger(__name__)

PACKAGE_CONFIGS = Path(__file__).parent / "model_configs"
PACKAGE_WEIGHTS = Path(__file__).parent / "weights"
open_clip.add_model_config(PACKAGE_CONFIGS)

# Keys that OpenAI's TorchScript archives carry beside the weights.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_DOWNLOAD_HOSTS = (("huggingface.co", 443), ("openaipublic.azureedge.net", 443))


@dataclass(frozen=True)
class BackboneSpec:
    """Where a CLIP comes from: an open_clip name plus a pretrained tag, a weights file, or neither
    (random weights seeded by ``init_seed``, for tests and benchmarks)."""

    name: str = "fedpgp-world"
    pretrained: str | None = "world"
    file: str | None = None
    init_seed: int = 0
    allow_torchscript: bool = False
    cache_dir: str | None = None


def available_models() -> list[str]:
    """Names of every architecture open_clip knows, the package's own included."""
    return open_clip.list_models()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _network_reachable(timeout: float = 3.0) -> bool:
    for host, port in _DOWNLOAD_HOSTS:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            continue
    return False


def _offline_message(name: str, tag: str) -> str:
    return (
        f"cannot download CLIP weights '{tag}' for model '{name}': the download hosts are not "
        f"reachable. Download the weights on a machine with network (for OpenAI ViT-B/16: "
        f"https://openaipublic.azureedge.net/clip/models/.../ViT-B-16.pt, or the open_clip "
        f"checkpoint from huggingface.co) and pass the file with "
        f"--set backbone.file=/path/to/weights.pt (keep backbone.name={name})"
    )


def _packaged_weights(name: str, tag: str) -> Path | None:
    """A weights file shipped in the package for a packaged architecture, hash-checked."""
    manifest = PACKAGE_WEIGHTS / "weights.json"
    if not manifest.is_file():
        return None
    entries = json.loads(manifest.read_text())
    entry = entries.get(f"{name}:{tag}")
    if entry is None:
        return None
    path = PACKAGE_WEIGHTS / entry["file"]
    if not path.is_file():
        raise BackboneError(f"packaged weights file {path} is missing; reinstall fedpgp")
    actual = _sha256_file(path)
    if actual != entry["sha256"]:
        raise BackboneError(
            f"packaged weights file {path} has sha256 {actual[:16]}..., expected "
            f"{entry['sha256'][:16]}...: the file was altered; reinstall fedpgp or run "
            f"`fedpgp world pretrain` to rebuild it"
        )
    return path


def _resolve_tag(name: str, tag: str, cache_dir: str | None) -> Path:
    """The local path of pretrained weights named by a tag, downloading only when reachable."""
    packaged = _packaged_weights(name, tag)
    if packaged is not None:
        return packaged
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise BackboneError(
            f"backbone.pretrained: unknown tag '{tag}' for model '{name}' (known: {tags}); "
            f"or pass a weights file with backbone.file"
        )
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import hf_hub_download

        model_id, filename = os.path.split(hub)
        for candidate in (filename.replace(".bin", ".safetensors"), filename):
            if not candidate:
                continue
            try:
                local = hf_hub_download(
                    model_id, candidate, cache_dir=cache_dir, local_files_only=True
                )
                return Path(local)
            except Exception:
                continue
    if not _network_reachable():
        raise BackboneError(_offline_message(name, tag))
    try:
        return Path(open_clip.download_pretrained(cfg, cache_dir=cache_dir))
    except Exception as exc:
        raise BackboneError(f"{_offline_message(name, tag)} ({type(exc).__name__}: {exc})") from exc


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(entry.split("/")[1:2] == ["code"] for entry in archive.namelist())


def read_state_dict(path: Path, allow_torchscript: bool = False) -> dict[str, Tensor]:
    """Tensors of a CLIP weights file (safetensors, a pickled state dict, or, on opt-in, an OpenAI
    TorchScript archive). Never runs code from the file unless ``allow_torchscript``."""
    if not path.is_file():
        raise BackboneError(f"backbone weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif _is_torchscript(path):
            if not allow_torchscript:
                raise BackboneError(
                    f"{path} is a TorchScript archive, and loading one runs code from the file; "
                    f"set backbone.allow_torchscript=true if you trust it"
                )
            warnings.warn(
                f"loading TorchScript {path}: this executes code from the file", stacklevel=2
            )
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except BackboneError:
        raise
    except Exception as exc:
        raise BackboneError(
            f"{path} is not a readable CLIP weights file ({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not hold a dictionary of tensors (a CLIP state dict)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    for key in _OPENAI_EXTRA_KEYS:
        state.pop(key, None)
    return state


def _text_tower(model: nn.Module) -> nn.Module:
    """open_clip keeps the text modules on the CLIP itself or on ``model.text``."""
    tower = getattr(model, "text", model)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    if not all(hasattr(tower, attr) for attr in needed):
        raise BackboneError(
            f"{type(model).__name__} has no CLIP-style text transformer; prompt learning needs one"
        )
    return tower


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
        self.tokenizer = open_clip.get_tokenizer(name)
        self.register_buffer("token_map", token_map, persistent=False)
        preprocess = model.visual.preprocess_cfg
        self.image_size = int(model.visual.image_size[0])
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
            path = _resolve_tag(spec.name, spec.pretrained, spec.cache_dir)
        with torch.random.fork_rng(devices=[]), _quiet_open_clip():
            torch.manual_seed(spec.init_seed)
            model = open_clip.create_model(spec.name, pretrained=None, load_weights=False)
        token_map = None
        if path is None:
            digest = f"random-{_sha256_state(model.state_dict())[:16]}"
        else:
            state = read_state_dict(path, spec.allow_torchscript)
            token_map = state.pop("token_map", None)
            _load_weights(model, state, path, spec.name)
            digest = _sha256_file(path)[:16]
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

    def encode_prompts(self, embeddings: Tensor, eot_index: Tensor) -> Tensor:
        """L2-normalised text features of prompt embeddings (N, L, D).

        Runs the transformer only over positions up to the last EOT in the batch: attention is
        causal, so later positions cannot change any EOT feature.
        """
        length = int(eot_index.max()) + 1
        with self.autocast():
            x = embeddings[:, :length] + self.text.positional_embedding[:length]
            mask = self.text.attn_mask
            x = self.text.transformer(x, attn_mask=None if mask is None else mask[:length, :length])
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
        """Resize the short side, center crop, normalise (METHOD.md section 2)."""
        return T.Compose(
            [
                T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(self.image_size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def train_transform(self) -> T.Compose:
        """Random resized crop (scale 0.08-1, bicubic) and horizontal flip (METHOD.md section 2)."""
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


def _load_weights(model: nn.Module, state: dict[str, Tensor], path: Path, name: str) -> None:
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:3]}")
        if unexpected:
            details.append(f"unexpected {unexpected[:3]}")
        if wrong:
            k = wrong[0]
            details.append(f"shape of {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}")
        raise BackboneError(
            f"{path} is not a CLIP checkpoint for '{name}' ({'; '.join(details)}); "
            f"check backbone.name (OpenAI weights need the '-quickgelu' names)"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


# --- pretraining support (used by fedpgp.world) ---


def build_token_map(texts: list[str], vocab_size: int) -> Tensor:
    """A compact vocabulary for a model that reads only the words of ``texts``.

    Returns ``token_map`` (int64, one entry per open_clip BPE id): padding -> 0, the BPE ids
    used by ``texts`` -> 1, 2, ... in ascending BPE order, start-of-text -> ``vocab_size - 2``,
    end-of-text -> ``vocab_size - 1`` (the largest id, so open_clip's argmax pooling still finds
    it), every other id -> -1 (unknown; FrozenCLIP.tokenize rejects it).
    """
    tokenizer = open_clip.SimpleTokenizer()
    words = sorted({i for text in texts for i in tokenizer.encode(text)})
    if len(words) + 3 > vocab_size:
        raise BackboneError(
            f"the texts use {len(words)} BPE tokens; with padding, start and end of text they "
            f"need vocab_size >= {len(words) + 3}, the model has {vocab_size}"
        )
    token_map = torch.full((tokenizer.vocab_size,), -1, dtype=torch.int64)
    token_map[0] = 0
    token_map[torch.tensor(words, dtype=torch.int64)] = torch.arange(1, len(words) + 1)
    token_map[tokenizer.sot_token_id] = vocab_size - 2
    token_map[tokenizer.eot_token_id] = vocab_size - 1
    return token_map


def tokenize_compact(name: str, texts: list[str], token_map: Tensor) -> Tensor:
    """Token ids (N, context length of ``name``) of ``texts`` in the compact vocabulary."""
    raw = open_clip.get_tokenizer(name)(texts)
    ids = token_map[raw]
    if (ids < 0).any():
        bad = [text for text, row in zip(texts, ids, strict=False) if (row < 0).any()]
        raise BackboneError(f"the compact vocabulary has no token for a word in: {bad[:5]}")
    return ids


def create_trainable_clip(name: str, seed: int) -> nn.Module:
    """A randomly initialised open_clip model ``name`` (fp32, train mode), seeded by ``seed``."""
    if name not in available_models():
        raise BackboneError(f"unknown model '{name}'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None, load_weights=False)
    return model.float().train()


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
