"""Where CLIP weights come from: an open_clip name plus a pretrained tag (the package's shipped
world weights, a local hub cache, or a download when the network is reachable), or a local file
(safetensors, an OpenAI state dict, an open_clip checkpoint; OpenAI's TorchScript archives only on
opt-in, since loading one runs code from the file)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import warnings
import zipfile
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn

from ..errors import BackboneError

log = logging.getLogger(__name__)

PACKAGE_CONFIGS = Path(__file__).resolve().parent.parent / "model_configs"
PACKAGE_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
open_clip.add_model_config(PACKAGE_CONFIGS)

# Keys that OpenAI's TorchScript archives carry beside the weights.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_DOWNLOAD_HOSTS = (("huggingface.co", 443), ("openaipublic.azureedge.net", 443))


def available_models() -> list[str]:
    """Names of every architecture open_clip knows, the package's own included."""
    return open_clip.list_models()


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise BackboneError(
            f"packaged weights file {path} has sha256 {actual[:16]}..., expected "
            f"{entry['sha256'][:16]}...: the file was altered; reinstall fedpgp or run "
            f"`fedpgp world pretrain` to rebuild it"
        )
    return path


def resolve_tag(name: str, tag: str) -> Path:
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
                local = hf_hub_download(model_id, candidate, local_files_only=True)
                return Path(local)
            except Exception:
                continue
    if not _network_reachable():
        raise BackboneError(_offline_message(name, tag))
    try:
        return Path(open_clip.download_pretrained(cfg))
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


def load_weights(model: nn.Module, state: dict[str, Tensor], path: Path, name: str) -> None:
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
