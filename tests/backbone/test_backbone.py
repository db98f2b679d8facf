"""FrozenCLIP: truncated prompt encoding equals open_clip's, weights loading and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fedpgp.backbone import BackboneSpec, FrozenCLIP
from fedpgp.errors import BackboneError

TINY = BackboneSpec(name="fedpgp-tiny", pretrained=None)


@pytest.fixture(scope="module")
def tiny() -> FrozenCLIP:
    return FrozenCLIP.load(TINY)


def test_every_parameter_is_frozen(tiny: FrozenCLIP) -> None:
    assert not any(p.requires_grad for p in tiny.parameters())
    assert not tiny.model.training


def test_truncated_encoding_equals_open_clip_encode_text(tiny: FrozenCLIP) -> None:
    texts = ["a dog.", "a photo of a very small red striped triangle on a table.", "x"]
    ids, eot = tiny.tokenize(texts)
    assert len(set(eot.tolist())) == 3
    ours = tiny.encode_prompts(tiny.embed_tokens(ids), eot)
    reference = F.normalize(tiny.model.encode_text(ids), dim=-1)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_same_seed_same_weights_and_identity() -> None:
    first, second = FrozenCLIP.load(TINY), FrozenCLIP.load(TINY)
    other = FrozenCLIP.load(BackboneSpec(name="fedpgp-tiny", pretrained=None, init_seed=1))
    assert first.identity == second.identity != other.identity


def test_weights_file_round_trip(tiny: FrozenCLIP, tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    loaded = FrozenCLIP.load(
        BackboneSpec(name="fedpgp-tiny", pretrained=None, file=str(path), init_seed=5)
    )
    _ids, eot = tiny.tokenize(["a cat."])
    assert torch.equal(loaded.encode_texts(["a cat."]), tiny.encode_texts(["a cat."]))
    assert loaded.identity != tiny.identity
    assert eot.item() == 4  # [SOS] a cat . [EOT]


def test_openai_style_pickled_state_dict_loads(tiny: FrozenCLIP, tmp_path: Path) -> None:
    path = tmp_path / "openai.pt"
    state = {k: v.half() for k, v in tiny.model.state_dict().items()}
    state.update(
        input_resolution=torch.tensor(32),
        context_length=torch.tensor(77),
        vocab_size=torch.tensor(49408),
    )
    torch.save(state, path)
    loaded = FrozenCLIP.load(BackboneSpec(name="fedpgp-tiny", pretrained=None, file=str(path)))
    assert torch.allclose(loaded.encode_texts(["a cat."]), tiny.encode_texts(["a cat."]), atol=1e-2)


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="does not exist"):
        FrozenCLIP.load(BackboneSpec(name="fedpgp-tiny", file=str(tmp_path / "none.pt")))


def test_file_that_is_not_a_clip_checkpoint(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(BackboneError, match="garbage.pt"):
        FrozenCLIP.load(BackboneSpec(name="fedpgp-tiny", file=str(garbage)))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"weight": torch.zeros(3)}, str(wrong))
    with pytest.raises(BackboneError, match="not a CLIP checkpoint"):
        FrozenCLIP.load(BackboneSpec(name="fedpgp-tiny", file=str(wrong)))


def test_unknown_model_name() -> None:
    with pytest.raises(BackboneError, match="unknown model 'no-such-clip'"):
        FrozenCLIP.load(BackboneSpec(name="no-such-clip", pretrained=None))


def test_unknown_pretrained_tag() -> None:
    with pytest.raises(BackboneError, match="unknown tag"):
        FrozenCLIP.load(BackboneSpec(name="fedpgp-tiny", pretrained="laion-nope"))


def test_offline_download_fails_fast_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedpgp.backbone.weights as weights

    monkeypatch.setattr(weights, "_network_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-cache")
    with pytest.raises(BackboneError, match="backbone.file="):
        weights.resolve_tag("ViT-B-16-quickgelu", "openai")
