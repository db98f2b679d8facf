"""FedMGP (Bo et al., NeurIPS 2025): G groups of paired text and vision prompts per client, of
which each client shares s, drawn by their similarity to last round's global groups
(docs/method.md section 15).

    T (G x M_t x D_t), V (G x M_v x D_v)     PERSONAL; group g pairs T[g] with V[g]
    l_g(x, c) = exp(logit_scale) f_{V[g]}(x) . Enc_{T[g]}(c)          prediction: mean_g l_g
    L = mean_g CE(l_g, y) + diversity
    diversity: div = weight (D_t + D_v) / 2, D_t = mean_c mean_{i<j} -mean_e |z_i,c - z_j,c|,
               D_v the same over the images' features; "official" adds |div| (as coded, it
               pulls the groups together), "paper" adds div (it pushes them apart)

After local training a client draws s groups of each modality without replacement, one at a
time, with probabilities softmax(sim / temperature), sim_g = max_r cos(vec T[g], vec G_r) to
the global groups G it received (uniformly, the same indices for both, before its first
selection), and uploads them in the order drawn. The server averages the uploads unweighted,
rank by rank: global group r is the mean of every client's r-th draw. A client writes the
global groups into the slots it last drew before it trains or predicts.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..prompts import PromptBank, PromptTemplate, normal_init
from ..seeding import torch_generator
from .base import Tensors
from .encoders import EncoderMethod, photo_template, text_context

# Each group's text context starts as "a photo" plus N(0, TEXT_NOISE^2) (the authors' per-group
# perturbation).
TEXT_NOISE = 0.01
# The modalities: PERSONAL groups, the global groups received, the slots last drawn.
MODALITIES = {
    "text": ("global_text", "chosen_text"),
    "vision": ("global_vision", "chosen_vision"),
}


def draw_without_replacement(
    probabilities: Tensor, count: int, generator: torch.Generator
) -> Tensor:
    """``count`` indices drawn one at a time, each with the probabilities of the indices not
    yet drawn, renormalised; in the order drawn."""
    # At least the smallest positive double: a sharp softmax that underflows to exact zeros
    # still leaves indices to draw after its certain ones.
    remaining = probabilities.double().clamp_min(torch.finfo(torch.float64).tiny)
    drawn = []
    for _ in range(count):
        index = int(torch.multinomial(remaining / remaining.sum(), 1, generator=generator))
        drawn.append(index)
        remaining[index] = 0.0
    return torch.tensor(drawn)


def group_similarity(groups: Tensor, global_groups: Tensor) -> Tensor:
    """sim_g = max_r cos(vec groups[g], vec global_groups[r]): (G,)."""
    mine = F.normalize(groups.flatten(1).double(), dim=-1)
    theirs = F.normalize(global_groups.flatten(1).double(), dim=-1)
    return (mine @ theirs.t()).max(dim=1).values


def mean_pairwise_l1(features: Tensor) -> Tensor:
    """mean over pairs i < j of groups of mean_e |features[i] - features[j]|, averaged over
    the other rows: features (G, R, E) -> a scalar (0 for one group)."""
    pairs = list(itertools.combinations(range(features.shape[0]), 2))
    if not pairs:
        return features.new_zeros(())
    first, second = (torch.tensor(side) for side in zip(*pairs, strict=True))
    return (features[first] - features[second]).abs().mean()


class FedMGP(EncoderMethod):
    name = "fedmgp"
    global_keys = ("global_text", "global_vision")
    personal_keys = ("text", "vision", "chosen_text", "chosen_vision")
    aggregation = "mean"
    # Every evaluation encodes each test image G times per client: the final round only.
    eval_every = None

    @property
    def template(self) -> PromptTemplate:
        return photo_template(self.cfg.fedmgp.text_length, "fedmgp.text_length")

    def init_personal(self, width: int, generator: torch.Generator) -> Tensors:
        """Group g's text context: "a photo" + N(0, 0.01^2); vision groups N(0, 0.02^2); no
        slot drawn yet (-1)."""
        settings = self.cfg.fedmgp
        groups, selected = settings.groups, settings.selected
        first = text_context(self.backbone, settings.text_length, generator)
        noise = TEXT_NOISE * torch.randn((groups, *first.shape), generator=generator)
        vision = (groups, settings.vision_length, self.tower.width)
        return {
            "text": first.unsqueeze(0) + noise,
            "vision": normal_init(vision, generator),
            "chosen_text": torch.full((selected,), -1.0),
            "chosen_vision": torch.full((selected,), -1.0),
        }

    def initial_personal(self, width: int, client_id: int) -> Tensors:
        """The same starting groups for every client, as the authors' clients all start
        from one initial state."""
        return self.init_personal(width, torch_generator(self.cfg.seed, "init", "fedmgp-groups"))

    def init_global(self, width: int, generator: torch.Generator) -> Tensors:
        """The first s starting groups: what the server holds before any upload (no client
        writes them into a slot before it has drawn one)."""
        start = self.initial_personal(width, 0)
        selected = self.cfg.fedmgp.selected
        return {
            "global_text": start["text"][:selected],
            "global_vision": start["vision"][:selected],
        }

    def merge(self, params: Mapping[str, Tensor]) -> Tensors:
        """The client's groups with the global groups written into the slots it last drew."""
        merged = dict(params)
        for groups, (global_key, chosen_key) in MODALITIES.items():
            chosen = params[chosen_key].long()
            if bool((chosen >= 0).all()):
                written = params[groups].clone()
                written[chosen] = params[global_key].to(written.dtype)
                merged[groups] = written
        return merged

    def after_training(
        self,
        params: Mapping[str, Tensor],
        received: Mapping[str, Tensor],
        generator: torch.Generator,
    ) -> Tensors:
        """The groups to upload, drawn by similarity to the global groups received."""
        settings = self.cfg.fedmgp
        count = settings.selected
        first = bool((params["chosen_text"] < 0).any() or (params["chosen_vision"] < 0).any())
        if first:
            uniform = torch.randperm(settings.groups, generator=generator)[:count]
            chosen = {"text": uniform, "vision": uniform}
        else:
            scores = {
                groups: group_similarity(params[groups].detach(), received[global_key])
                / settings.temperature
                for groups, (global_key, _) in MODALITIES.items()
            }
            if settings.selection == "joint":
                joint = draw_without_replacement(
                    (scores["text"] + scores["vision"]).softmax(0), count, generator
                )
                chosen = {"text": joint, "vision": joint}
            else:
                chosen = {
                    groups: draw_without_replacement(score.softmax(0), count, generator)
                    for groups, score in scores.items()
                }
        out = dict(params)
        for groups, (_, chosen_key) in MODALITIES.items():
            out[chosen_key] = chosen[groups].to(params[chosen_key])
        return out

    def upload(self, params: Mapping[str, Tensor], received: Mapping[str, Tensor]) -> Tensors:
        """The drawn groups, in the order drawn."""
        return {
            global_key: params[groups][params[chosen_key].long()]
            for groups, (global_key, chosen_key) in MODALITIES.items()
        }

    def class_features(self, params: Mapping[str, Tensor], bank: PromptBank) -> Tensor:
        """Every group's class features (G, C, E), the G contexts in one encoder call."""
        return bank.encode(params["text"])

    def encode_images(self, params: Mapping[str, Tensor], features: Tensor) -> Tensor:
        """Every group's image features (N, G, E), the G x N prompted images in one pass."""
        groups = params["vision"]
        count, number = features.shape[0], groups.shape[0]
        stems = features.repeat(number, *([1] * (features.dim() - 1)))
        encoded = self.tower.encode(stems, groups.repeat_interleave(count, dim=0))
        return encoded.view(number, count, -1).transpose(0, 1)

    def logits(self, features: Tensor, text_features: Tensor) -> Tensor:
        """The mean over groups of exp(logit_scale) f_g . z_g: (N, G, E), (G, C, E) -> (N, C)."""
        return (
            self.logit_scale
            * torch.einsum("nge,gce->nc", features, text_features)
            / (text_features.shape[0])
        )

    def loss(
        self,
        params: Mapping[str, Tensor],
        features: Tensor,
        labels: Tensor,
        bank: PromptBank,
        round_start: Mapping[str, Tensor],
    ) -> Tensor:
        text = self.class_features(params, bank)
        images = self.encode_images(params, features)
        per_group = self.logit_scale * torch.einsum("nge,gce->gnc", images, text)
        ce = F.cross_entropy(per_group.flatten(0, 1), labels.repeat(text.shape[0]))
        settings = self.cfg.fedmgp
        # D_t and D_v are minus the mean pairwise distances.
        div = (
            -settings.weight
            * (mean_pairwise_l1(text) + mean_pairwise_l1(images.transpose(0, 1)))
            / 2
        )
        return ce + (div.abs() if settings.diversity == "official" else div)
