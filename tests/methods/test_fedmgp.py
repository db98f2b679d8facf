"""FedMGP against a reference written from ../shared/BASELINES.md Part B section 1 (loss, both
diversity signs, and gradients; the prediction as the mean of the groups' logits), its
selection (softmax(sim / T) probabilities, checked over seeded draws), the server's unweighted
mean matched by rank, and what leaves a client: exactly the groups it drew."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from runkit import clients_of, start_global, tiny_config
from torch import Tensor
from towers import assert_gradients_match, cross_entropy, image_features, text_features

from fedpgp.backbone import BackboneSpec, FrozenCLIP
from fedpgp.backbone.prompted import PromptedImageTower
from fedpgp.config import load_config
from fedpgp.errors import ConfigError
from fedpgp.experiment import build_experiment
from fedpgp.federation.inprocess import run_inprocess
from fedpgp.federation.server import Server
from fedpgp.federation.update import Update
from fedpgp.methods.base import method_for
from fedpgp.methods.fedmgp import FedMGP
from fedpgp.prompts import PromptBank

NAMES = ["dog", "red striped triangle", "cat", "wine glass"]
LABELS = torch.tensor([0, 3, 1, 2, 2])


@pytest.fixture(scope="module")
def tiny() -> FrozenCLIP:
    return FrozenCLIP.load(BackboneSpec("fedpgp-tiny", None))


def _method(backbone: FrozenCLIP, *overrides: str) -> FedMGP:
    method = method_for(load_config(None, ["method=fedmgp", *overrides]), backbone)
    assert isinstance(method, FedMGP)
    return method


def _groups(method: FedMGP, backbone: FrozenCLIP, seed: int) -> dict[str, Tensor]:
    """The starting groups, each moved apart by N(0, 0.1^2) so that the groups differ."""
    start = method.initial_personal(backbone.text_width, 0)
    generator = torch.Generator().manual_seed(seed)
    return {
        key: start[key] + 0.1 * torch.randn(start[key].shape, generator=generator)
        for key in ("text", "vision")
    }


def _reference(
    backbone: FrozenCLIP, text: Tensor, vision: Tensor, images: Tensor, weight: float, sign: str
) -> Tensor:
    """mean_g CE(l_g) + the diversity term, every group, class, image and pair in a loop."""
    groups = text.shape[0]
    z = [text_features(backbone, NAMES, text[g], "of a {}.") for g in range(groups)]
    f = [image_features(backbone, images, vision[g]) for g in range(groups)]
    ce = sum(cross_entropy(backbone.logit_scale * f[g] @ z[g].t(), LABELS) for g in range(groups))
    pairs = list(itertools.combinations(range(groups), 2))
    d_t = sum(
        sum(-(z[i][c] - z[j][c]).abs().mean() for i, j in pairs) / len(pairs)
        for c in range(len(NAMES))
    ) / len(NAMES)
    d_v = sum(
        sum(-(f[i][b] - f[j][b]).abs().mean() for i, j in pairs) / len(pairs)
        for b in range(len(images))
    ) / len(images)
    div = weight * (d_t + d_v) / 2
    return ce / groups + (div.abs() if sign == "official" else div)


@pytest.mark.parametrize(("sign", "weight"), [("official", 1.0), ("paper", 1.0), ("official", 0.0)])
def test_loss_and_gradients_equal_the_reference(tiny: FrozenCLIP, sign: str, weight: float) -> None:
    method = _method(tiny, "fedmgp.groups=3", f"fedmgp.diversity={sign}", f"fedmgp.weight={weight}")
    groups = _groups(method, tiny, seed=1)
    size = tiny.image_size
    images = torch.randn(len(LABELS), 3, size, size, generator=torch.Generator().manual_seed(2))
    bank = PromptBank(tiny, NAMES, *method.template)

    params = {k: v.clone().requires_grad_() for k, v in groups.items()}
    stems = PromptedImageTower(tiny).stem(images)
    loss = method.loss(params, stems, LABELS, bank, {})
    loss.backward()

    text, vision = (groups[k].clone().requires_grad_() for k in ("text", "vision"))
    expected = _reference(tiny, text, vision, images, weight, sign)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=0)
    assert_gradients_match(
        {k: v.grad for k, v in params.items()}, {"text": text.grad, "vision": vision.grad}
    )
    if weight:
        # The two signs differ by twice the diversity term, which is not zero.
        other = "paper" if sign == "official" else "official"
        flipped = _reference(tiny, groups["text"], groups["vision"], images, weight, other)
        assert abs(float(flipped.detach() - expected.detach())) > 1e-3


def test_prediction_is_the_argmax_of_the_mean_of_the_groups_logits(tiny: FrozenCLIP) -> None:
    method = _method(tiny, "fedmgp.groups=3")
    groups = _groups(method, tiny, seed=3)
    size = tiny.image_size
    images = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(4))
    bank = PromptBank(tiny, NAMES, *method.template)
    with torch.no_grad():
        logits = (
            sum(
                tiny.logit_scale
                * image_features(tiny, images, groups["vision"][g])
                @ text_features(tiny, NAMES, groups["text"][g], "of a {}.").t()
                for g in range(3)
            )
            / 3
        )
        ours = method.image_logits(groups, bank, PromptedImageTower(tiny).stem(images))
    torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(
        method.predict(groups, bank, PromptedImageTower(tiny).stem(images)), logits.argmax(-1)
    )


def _similarities(groups: Tensor, global_groups: Tensor) -> Tensor:
    """max over global groups r of the cosine of the flattened groups."""
    sims = torch.zeros(groups.shape[0], dtype=torch.float64)
    for g in range(groups.shape[0]):
        mine = groups[g].flatten().double()
        sims[g] = max(
            float(mine @ other.flatten().double() / (mine.norm() * other.flatten().double().norm()))
            for other in global_groups
        )
    return sims


def test_selection_follows_softmax_of_similarity_over_temperature(tiny: FrozenCLIP) -> None:
    groups = _groups(_method(tiny), tiny, seed=5)
    generator = torch.Generator().manual_seed(6)
    received = {
        f"global_{k}": v[:2] + 0.3 * torch.randn(2, *v.shape[1:], generator=generator)
        for k, v in groups.items()
    }
    sims = _similarities(groups["text"], received["global_text"])
    # A temperature that spreads the probabilities over a factor of e^1.5: every ordered pair
    # is drawn often enough for the chi-square below.
    temperature = float(sims.max() - sims.min()) / 1.5
    method = _method(tiny, f"fedmgp.temperature={temperature}")
    chosen = {"chosen_text": torch.tensor([0.0, 1.0]), "chosen_vision": torch.tensor([1.0, 3.0])}
    params = {**groups, **chosen}
    p = torch.softmax(sims / temperature, 0)
    # P(first i, then j) for a draw without replacement, renormalised after the first.
    expected = {
        (i, j): float(p[i] * p[j] / (1 - p[i])) for i in range(5) for j in range(5) if i != j
    }
    draws = 4000
    assert min(expected.values()) * draws >= 5, "too few expected draws for the chi-square"
    counts = dict.fromkeys(expected, 0)
    for seed in range(draws):
        out = method.after_training(params, received, torch.Generator().manual_seed(seed))
        first, second = (int(i) for i in out["chosen_text"])
        counts[(first, second)] += 1
    chi2 = sum((counts[k] - draws * e) ** 2 / (draws * e) for k, e in expected.items())
    # 19 degrees of freedom: above 43.82 with probability 0.001.
    assert chi2 < 43.82, (chi2, counts)
    # The same draws against uniform probabilities are far off: the test can tell.
    uniform = sum((n - draws / 20) ** 2 / (draws / 20) for n in counts.values())
    assert uniform > 100, uniform


def test_the_first_selection_is_uniform_and_the_same_for_both_modalities(tiny: FrozenCLIP) -> None:
    method = _method(tiny)
    start = {
        **method.initial_global(tiny.text_width),
        **method.initial_personal(tiny.text_width, 0),
    }
    seen = set()
    for seed in range(200):
        out = method.after_training(start, start, torch.Generator().manual_seed(seed))
        assert torch.equal(out["chosen_text"], out["chosen_vision"])
        seen.add(tuple(int(i) for i in out["chosen_text"]))
    # 5 x 4 ordered pairs, all drawn.
    assert len(seen) == 20


def test_the_server_averages_unweighted_matched_by_rank(tiny: FrozenCLIP) -> None:
    method = _method(tiny)
    initial = method.initial_global(tiny.text_width)
    server = Server(method, initial, 3, seed=0, sample_counts={0: 1, 1: 50, 2: 7})
    generator = torch.Generator().manual_seed(7)
    updates = [
        Update(
            cid, 0, {k: torch.randn(v.shape, generator=generator) for k, v in initial.items()}, n
        )
        for cid, n in ((0, 1), (1, 50), (2, 7))
    ]
    accepted, faults = server.screen(0, updates, 1)
    server.aggregate(accepted)
    assert not faults
    for key in initial:
        for rank in range(2):
            mean = sum(u.tensors[key][rank] for u in updates) / 3
            torch.testing.assert_close(server.global_tensors[key][rank], mean)


def test_only_the_drawn_groups_leave_and_come_back_into_their_slots(tiny_data: Path) -> None:
    experiment = build_experiment(tiny_config(tiny_data, method="fedmgp", lr=0.05))
    clients = clients_of(experiment)
    client = clients[0]
    received = start_global(experiment)
    update = client.train(received, 0)
    personal = client.personal
    assert set(update.tensors) == {"global_text", "global_vision"}
    assert set(personal) == {"text", "vision", "chosen_text", "chosen_vision"}
    for groups, key in (("text", "global_text"), ("vision", "global_vision")):
        chosen = personal[f"chosen_{groups}"].long()
        # The drawn groups, in the order drawn, and nothing of the groups not drawn.
        assert torch.equal(update.tensors[key], personal[groups][chosen])
        others = [g for g in range(5) if g not in chosen.tolist()]
        for row in update.tensors[key]:
            assert not any(torch.equal(row, personal[groups][g]) for g in others)
    # The next round (or a prediction) starts from the global groups in the drawn slots.
    new_global = {k: v + 1.0 for k, v in received.items()}
    params = client.params(new_global)
    for groups, key in (("text", "global_text"), ("vision", "global_vision")):
        chosen = personal[f"chosen_{groups}"].long()
        assert torch.equal(params[groups][chosen], new_global[key])
        kept = [g for g in range(5) if g not in chosen.tolist()]
        assert torch.equal(params[groups][kept], personal[groups][kept])


def test_every_client_starts_from_the_same_groups_and_the_global_is_their_first(
    tiny: FrozenCLIP,
) -> None:
    method = _method(tiny)
    width = tiny.text_width
    one, other = method.initial_personal(width, 0), method.initial_personal(width, 5)
    assert all(torch.equal(one[k], other[k]) for k in one)
    assert torch.equal(method.initial_global(width)["global_text"], one["text"][:2])
    ids, _ = tiny.tokenize(["a photo"])
    photo = tiny.embed_tokens(ids)[0, 1:3]
    # Each group's text context is "a photo" plus N(0, 0.01^2).
    assert float((one["text"] - photo).std()) == pytest.approx(0.01, rel=0.2)


def test_more_groups_selected_than_held_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"fedmgp\.selected: expected at most fedmgp\.groups \(5\), got 6"
    ):
        load_config(None, ["method=fedmgp", "fedmgp.selected=6"])


def test_only_the_final_round_is_evaluated_unless_asked(tiny_data: Path) -> None:
    cfg = tiny_config(tiny_data, method="fedmgp", rounds=3)
    rows, _, _ = run_inprocess(build_experiment(cfg))
    assert [row["round"] for row in rows] == [3]
    every = tiny_config(tiny_data, method="fedmgp", rounds=3, eval_every=1)
    rows_every, _, _ = run_inprocess(build_experiment(every))
    assert [row["round"] for row in rows_every] == [1, 2, 3]
    assert rows_every[-1]["local"] == rows[-1]["local"]


def test_a_softmax_sharp_enough_to_underflow_still_draws_distinct_groups() -> None:
    from fedpgp.methods.fedmgp import draw_without_replacement

    sharp = torch.softmax(torch.tensor([0.0, 1.0, 0.5, 0.2]) / 1e-4, 0)
    assert (sharp == 0).sum() == 3
    drawn = draw_without_replacement(sharp, 3, torch.Generator().manual_seed(0))
    assert int(drawn[0]) == 1 and len(set(drawn.tolist())) == 3
