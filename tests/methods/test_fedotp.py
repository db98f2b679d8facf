"""FedOTP the method: its logits, what leaves a client, patch features from the backbone and the
feature cache, and whole runs in process and in ``fedpgp compare``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from runkit import clients_of, start_global, start_personal
from tiny import tiny_overrides

from fedpgp.backbone import BackboneSpec, FrozenCLIP
from fedpgp.compare import DEFAULT_METHODS, compare
from fedpgp.config import RunConfig, load_config
from fedpgp.errors import ConfigError, FedPGPError
from fedpgp.experiment import Experiment, build_experiment
from fedpgp.methods.base import create_method
from fedpgp.methods.registry import FedOTPSettings, method_class
from fedpgp.ot import transport_plan
from fedpgp.runner import execute


def fedotp_config(data: Path, **extra: object) -> RunConfig:
    return load_config(None, tiny_overrides(data, method="fedotp", **extra))


@pytest.fixture(scope="module")
def experiment(tiny_data: Path) -> Experiment:
    return build_experiment(fedotp_config(tiny_data))


def test_equal_prompts_large_eps_sinkhorn_give_uniform_plan_and_mean_similarity(
    tiny_data: Path,
) -> None:
    cfg = load_config(None, tiny_overrides(tiny_data, method="fedotp"))
    cfg.fedotp = FedOTPSettings(ot="sinkhorn", eps=1e6)
    method = create_method(cfg, logit_scale=100.0)
    # One image of 4 patches in 2-d; class 0 is the direction (1, 0), class 1 is (0, 1), and
    # both prompts give the same text feature.
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(2, 2, 2)
    # By hand: class 0 similarities 1, 0, 0.6, 0.8 (mean 0.6); class 1: 0, 1, 0.8, -0.6 (0.3).
    sim = torch.einsum("bpe,nce->bcpn", patches, text)
    plan = transport_plan(sim, cfg.fedotp)
    torch.testing.assert_close(plan, torch.full_like(plan, 1 / 8), atol=1e-7, rtol=0)
    logits = method.logits(patches, text)
    torch.testing.assert_close(logits, torch.tensor([[60.0, 30.0]]), atol=1e-4, rtol=0)


def test_update_holds_prompt_zero_only(experiment: Experiment) -> None:
    client = clients_of(experiment)[0]
    global_tensors = start_global(experiment)
    local_before = client.personal["ctx_local"].clone()
    update = client.train(global_tensors, 0)
    assert set(update.tensors) == {"ctx_global"}
    assert set(client.personal) == {"ctx_local"}
    assert not torch.equal(client.personal["ctx_local"], local_before)
    assert not torch.equal(update.tensors["ctx_global"], global_tensors["ctx_global"])
    # Nothing in the update is the personal prompt.
    for tensor in update.tensors.values():
        assert not torch.equal(tensor, client.personal["ctx_local"])


def test_gradient_reaches_both_prompts_and_loss_is_cross_entropy(experiment: Experiment) -> None:
    method, data = experiment.method, experiment.client_data[0]
    params = {
        **start_global(experiment),
        **start_personal(experiment, 0),
    }
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    features = data.train_features[0][:4]
    labels = data.train_labels[:4]
    loss = method.loss(params, features, labels, data.bank, {})
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    logits = method.logits(features, method.class_features(params, data.bank))
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))


def test_backbone_patch_features_equal_open_clip_tokens() -> None:
    backbone = FrozenCLIP.load(BackboneSpec("fedpgp-tiny", None))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pooled, patches = backbone.encode_images_with_patches(images)
    assert patches.shape == (3, 16, backbone.embed_dim)
    torch.testing.assert_close(pooled, backbone.encode_images(images))
    # Independent reference: open_clip's own forward with output_tokens returns the ln_post'd
    # patch tokens; project and normalise them as FedOTP's code does.
    visual = backbone.model.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            ref_pooled, tokens = visual(images)
    finally:
        visual.output_tokens = False
    torch.testing.assert_close(patches, F.normalize(tokens @ visual.proj, dim=-1))
    torch.testing.assert_close(pooled, F.normalize(ref_pooled, dim=-1))


def test_experiment_patches_come_from_the_cache_without_reencoding(
    experiment: Experiment, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = experiment.base
    assert base.features.shape[1:] == (16, experiment.backbone.embed_dim)
    assert base.features.dtype == torch.float16
    # The stored patches are the backbone's patches of the same test images.
    images = torch.stack(
        [
            experiment.backbone.test_transform()(experiment.splits.test.images[i])
            for i in experiment.manifest.base_test[:3]
        ]
    )
    _, fresh = experiment.backbone.encode_images_with_patches(images)
    torch.testing.assert_close(base.features[:3].float(), fresh, atol=1e-3, rtol=0)

    def no_encoding(self: FrozenCLIP, images: torch.Tensor) -> None:
        raise AssertionError("patch features were encoded again")

    monkeypatch.setattr(FrozenCLIP, "encode_images_with_patches", no_encoding)
    again = build_experiment(fedotp_config(tiny_data))
    assert torch.equal(again.base.features, base.features)


def test_with_method_switches_between_pooled_and_patch_features(
    experiment: Experiment, tiny_data: Path
) -> None:
    pooled = experiment.with_method("fedpgp")
    assert pooled.base.features.dim() == 2 and pooled.method.name == "fedpgp"
    assert pooled.client_data[0].train_features.dim() == 3
    back = pooled.with_method("fedotp")
    assert back.base.features.dim() == 3 and back.client_data[0].train_features.dim() == 4
    without = build_experiment(load_config(None, tiny_overrides(tiny_data)))
    with pytest.raises(ConfigError, match="fedotp reads image features of kind 'patches'"):
        without.with_method("fedotp")


def test_fedotp_run_writes_results(tiny_data: Path, tmp_path: Path) -> None:
    execute(fedotp_config(tiny_data), tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "fedotp"
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    for key in ("local", "base", "novel", "hm"):
        assert 0.0 <= results["final"][key] <= 100.0


def test_tiny_eps_fails_the_run_naming_the_keys(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(FedPGPError, match="fedotp.eps"):
        execute(fedotp_config(tiny_data, **{"fedotp.eps": 1e-4}), tmp_path / "run")


def test_compare_runs_fedotp_beside_pooled_methods(tiny_data: Path, tmp_path: Path) -> None:
    # Its round costs 5x FedPGP's on the world: left out of the default list.
    assert "fedotp" not in DEFAULT_METHODS and method_class("fedotp").image_kind == "patches"
    cfg = load_config(None, tiny_overrides(tiny_data, rounds=1))
    rows = compare(cfg, ["zeroshot", "promptfl", "fedotp"], [0], tmp_path)
    assert [row["method"] for row in rows] == ["zeroshot", "promptfl", "fedotp"]
    assert (tmp_path / "fedotp" / "seed0" / "results.json").is_file()


@pytest.mark.slow
def test_flower_simulation_equals_the_inprocess_run(tiny_data: Path, tmp_path: Path) -> None:
    from fedpgp.federation.flower.sim import run_flower_simulation

    cfg = fedotp_config(tiny_data, rounds=2, device="cpu")
    execute(cfg, tmp_path / "inprocess")
    expected = json.loads((tmp_path / "inprocess" / "results.json").read_text())
    assert run_flower_simulation(cfg, tmp_path / "flower") == expected
