"""World pretraining: captions fit the model, the vocabulary is complete, runs are reproducible,
and installed weights are hash-checked at load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fedpgp.backbone.weights as weights_module
from fedpgp.backbone import BackboneSpec, FrozenCLIP, bpe_tokenizer
from fedpgp.errors import BackboneError
from fedpgp.world.commands import install_weights
from fedpgp.world.model import create_trainable_clip
from fedpgp.world.pretrain import (
    MODEL_NAME,
    TEMPLATES,
    PretrainSettings,
    contrastive_loss,
    pretrain,
    vocabulary_texts,
    world_token_map,
)

TINY = PretrainSettings(
    seed=5, steps=2, batch_size=8, warmup_steps=1, pool_per_class=1, threads=1, eval_per_class=1
)


def test_captions_fit_and_reach_the_prompt_learning_positions() -> None:
    model = create_trainable_clip(MODEL_NAME, 0)
    token_map = world_token_map(model.token_embedding.num_embeddings)
    tokenizer = bpe_tokenizer()
    lengths = [len(tokenizer.encode(text)) + 2 for text in vocabulary_texts()]
    assert max(lengths) <= model.context_length  # nothing is truncated
    # 16 context vectors put a class name at positions 17-19: some caption must train them.
    starts = [len(tokenizer.encode(t.split("{}")[0])) + 1 for t in TEMPLATES]
    assert max(starts) >= 17 and min(starts) == 1
    assert int(token_map.max()) == model.token_embedding.num_embeddings - 1
    assert int(token_map[tokenizer.eot_token_id]) == int(token_map.max())


def test_contrastive_loss_counts_every_image_of_a_class_as_positive() -> None:
    images = torch.nn.functional.normalize(torch.eye(4)[[0, 0, 1, 2]], dim=1)
    captions = torch.eye(4)[:3]
    classes = torch.tensor([0, 0, 1, 2])
    scale = torch.tensor(100.0)
    matched = contrastive_loss(images, captions, classes, scale)
    mismatched = contrastive_loss(images, captions[[1, 2, 0]], classes, scale)
    assert matched < 1.0 < mismatched


def test_short_pretraining_is_deterministic_and_installs(tmp_path: Path, monkeypatch) -> None:
    first = pretrain(tmp_path / "a.safetensors", TINY, log=lambda line: None)
    second = pretrain(tmp_path / "b.safetensors", TINY, log=lambda line: None)
    assert first.sha256 == second.sha256
    assert set(first.accuracy) == {"seen", "held_out", "all"}
    other = pretrain(
        tmp_path / "c.safetensors",
        TINY.__class__(**{**TINY.__dict__, "seed": 6}),
        log=lambda line: None,
    )
    assert other.sha256 != first.sha256

    package = tmp_path / "package"
    monkeypatch.setattr(weights_module, "PACKAGE_WEIGHTS", package)
    installed = install_weights(first.path, first.sha256)
    assert json.loads((package / "weights.json").read_text())["fedpgp-world:world"] == {
        "file": installed.name,
        "sha256": first.sha256,
    }
    spec = BackboneSpec(name=MODEL_NAME, pretrained="world")
    assert FrozenCLIP.load(spec).weights_digest == first.sha256[:16]

    data = bytearray(installed.read_bytes())
    data[-1] ^= 0x01
    installed.write_bytes(bytes(data))
    with pytest.raises(BackboneError, match="altered"):
        FrozenCLIP.load(spec)
    installed.unlink()
    with pytest.raises(BackboneError, match="missing"):
        FrozenCLIP.load(spec)
