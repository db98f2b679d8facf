"""Shared parts of the speed benchmarks: the authors' computation of a FedPGP step (written out
here as their code does it, on the same open_clip weights), timers, a synthetic dataset with real
class names, and the report format (a table, then the ratios; or one JSON object).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedpgp.backbone import FrozenCLIP
from fedpgp.config import RunConfig
from fedpgp.data import ArrayImages, DatasetSplits, LabeledSet, register
from fedpgp.data.datasets import dataset_names
from fedpgp.report import format_table

# Food-101's class names (Bossard et al. 2014), in its own order: real names of 1 to 5 tokens.
FOOD101 = [
    name.replace("_", " ")
    for name in """apple_pie baby_back_ribs baklava beef_carpaccio beef_tartare beet_salad beignets
    bibimbap bread_pudding breakfast_burrito bruschetta caesar_salad cannoli caprese_salad
    carrot_cake ceviche cheesecake cheese_plate chicken_curry chicken_quesadilla chicken_wings
    chocolate_cake chocolate_mousse churros clam_chowder club_sandwich crab_cakes creme_brulee
    croque_madame cup_cakes deviled_eggs donuts dumplings edamame eggs_benedict escargots falafel
    filet_mignon fish_and_chips foie_gras french_fries french_onion_soup french_toast
    fried_calamari fried_rice frozen_yogurt garlic_bread gnocchi greek_salad
    grilled_cheese_sandwich grilled_salmon guacamole gyoza hamburger hot_and_sour_soup hot_dog
    huevos_rancheros hummus ice_cream lasagna lobster_bisque lobster_roll_sandwich
    macaroni_and_cheese macarons miso_soup mussels nachos omelette onion_rings oysters pad_thai
    paella pancakes panna_cotta peking_duck pho pizza pork_chop poutine prime_rib
    pulled_pork_sandwich ramen ravioli red_velvet_cake risotto samosa sashimi scallops
    seaweed_salad shrimp_and_grits spaghetti_bolognese spaghetti_carbonara spring_rolls steak
    strawberry_shortcake sushi tacos takoyaki tiramisu tuna_tartare waffles""".split()
]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds of wall clock and of this process's CPU time (all its threads)."""

    wall: float
    cpu: float

    def cost(self, device: torch.device) -> float:
        """What the ratios compare: CPU time on a CPU (robust on a shared machine, where other
        processes take cores away at random), wall time on a GPU."""
        return self.wall if device.type == "cuda" else self.cpu


def timed(fn: Callable[[], object], device: torch.device) -> tuple[Timing, object]:
    """Timing of one call of ``fn`` (device work included) and its result."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    synchronize(device)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu), result


def median_timing(fn: Callable[[], object], device: torch.device, repeats: int) -> Timing:
    """Median wall and CPU seconds over ``repeats`` calls, after one warm-up call."""
    fn()
    runs = [timed(fn, device)[0] for _ in range(repeats)]
    return Timing(statistics.median(t.wall for t in runs), statistics.median(t.cpu for t in runs))


def set_threads(threads: int) -> None:
    """Torch's intra-op threads; 1 by default in the benchmarks, so that CPU time measures the
    work itself and not how well each side's kernels parallelise."""
    torch.set_num_threads(threads)


def relative_error(ours: Tensor, reference: Tensor) -> float:
    """||ours - reference|| / ||reference||."""
    return float((ours.double() - reference.double()).norm() / reference.double().norm())


# --- the authors' computation (trainers/fedpgp.py of their code, PREC fp32) ---------------


@dataclass
class AuthorsPrompts:
    """Their PromptLearner's frozen buffers for one class list: the full 77-token embedding of
    "X X .. X {name}." (also their z_C prompt: CTX_INIT is never set), and its EOT positions."""

    embedding: Tensor
    eot: Tensor
    n_ctx: int

    @classmethod
    def build(cls, backbone: FrozenCLIP, names: list[str], n_ctx: int) -> AuthorsPrompts:
        placeholder = " ".join(["X"] * n_ctx)
        ids, eot = backbone.tokenize([f"{placeholder} {name}." for name in names])
        with torch.no_grad():
            embedding = backbone.embed_tokens(ids)
        return cls(embedding, eot.to(embedding.device), n_ctx)

    def with_context(self, ctx: Tensor) -> Tensor:
        """cat([prefix, ctx, suffix]) for every class: (C, 77, D)."""
        classes = self.embedding.shape[0]
        return torch.cat(
            [
                self.embedding[:, :1],
                ctx.unsqueeze(0).expand(classes, -1, -1),
                self.embedding[:, 1 + self.n_ctx :],
            ],
            dim=1,
        )


def authors_text_encoder(backbone: FrozenCLIP, prompts: Tensor, eot: Tensor) -> Tensor:
    """Their TextEncoder: all 77 positions through the transformer, then normalised."""
    text = backbone.text
    x = prompts + text.positional_embedding
    x = text.transformer(x, attn_mask=text.attn_mask)
    x = text.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot] @ text.text_projection
    return x / x.norm(dim=-1, keepdim=True)


def authors_image_encoder(backbone: FrozenCLIP, images: Tensor) -> Tensor:
    features = backbone.model.visual(images)
    return features / features.norm(dim=-1, keepdim=True)


def authors_step_loss(
    backbone: FrozenCLIP,
    prompts: AuthorsPrompts,
    images: Tensor,
    labels: Tensor,
    sigma: Tensor,
    U: Tensor,
    V: Tensor,
    mu: float,
    tau: float,
) -> Tensor:
    """CustomCLIP.forward + forward_backward of their FedPGP trainer, up to the loss: the image
    encoder on the batch and four full-length text passes (z_P, z_C, z_G and the unused U V)."""
    image_features = authors_image_encoder(backbone, images)
    UV = U @ V
    z_p = authors_text_encoder(backbone, prompts.with_context(UV + sigma), prompts.eot)
    z_c = authors_text_encoder(backbone, prompts.embedding, prompts.eot)
    z_g = authors_text_encoder(backbone, prompts.with_context(sigma), prompts.eot)
    authors_text_encoder(backbone, prompts.with_context(UV), prompts.eot)
    logits = backbone.model.logit_scale.exp() * image_features @ z_p.t()
    positive = F.cosine_similarity(z_c, z_g, dim=-1)
    negative = F.cosine_similarity(z_g, z_p, dim=-1)
    pair_logits = torch.stack([positive, negative], dim=1) / tau
    target = torch.zeros(pair_logits.shape[0], dtype=torch.long, device=pair_logits.device)
    return F.cross_entropy(logits, labels) + mu * F.cross_entropy(pair_logits, target)


def authors_local_training(
    backbone: FrozenCLIP,
    prompts: AuthorsPrompts,
    images: Tensor,
    labels: Tensor,
    leaves: list[Tensor],
    cfg: RunConfig,
    generator: torch.Generator,
) -> None:
    """Their local round: SGD over the leaves (sigma, U, V), ``cfg.local_epochs`` shuffled
    passes of :func:`authors_step_loss`; the leaves are updated in place."""
    optimizer = torch.optim.SGD(
        leaves, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    for _ in range(cfg.local_epochs):
        order = torch.randperm(labels.shape[0], generator=generator).to(labels.device)
        for batch in order.split(cfg.train_batch_size):
            loss = authors_step_loss(
                backbone,
                prompts,
                images[batch],
                labels[batch],
                *leaves,
                cfg.fedpgp.mu,
                cfg.fedpgp.tau,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def authors_predict(
    backbone: FrozenCLIP, prompts: AuthorsPrompts, images: Tensor, ctx: Tensor, batch: int = 100
) -> Tensor:
    """Their test loop: for every batch of ``batch`` images, the image encoder and one
    full-length text pass of the personalized prompt."""
    predictions = []
    with torch.no_grad():
        for chunk in images.split(batch):
            z_p = authors_text_encoder(backbone, prompts.with_context(ctx), prompts.eot)
            logits = backbone.model.logit_scale.exp() * authors_image_encoder(backbone, chunk)
            predictions.append((logits @ z_p.t()).argmax(dim=-1))
    return torch.cat(predictions)


# --- a synthetic dataset with real class names ------------------------------------------------


def register_synthetic(
    name: str, classnames: list[str], train: int, test: int, size: int, seed: int = 0
) -> None:
    """Register dataset ``name``: random images of ``size`` pixels, ``train`` and ``test`` per
    class, held in memory (the loader ignores its root folder)."""
    if name in dataset_names():
        return
    rng = np.random.default_rng(seed)

    def split(per_class: int) -> LabeledSet:
        count = per_class * len(classnames)
        pixels = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
        labels = np.repeat(np.arange(len(classnames)), per_class)
        return LabeledSet(ArrayImages(pixels), labels)

    splits = DatasetSplits(name, list(classnames), split(train), split(test))

    @register(name)
    def load(root: Path) -> DatasetSplits:
        return splits


# --- report ---------------------------------------------------------------------------------


def report(
    title: str,
    header: list[str],
    rows: list[list[object]],
    ratios: dict[str, float],
    notes: list[str],
    as_json: bool,
    extra: dict[str, object] | None = None,
) -> None:
    """Print the table, the notes and the ratios last; or, with ``as_json``, one JSON object."""
    if as_json:
        print(json.dumps({"ratios": ratios, **(extra or {}), "notes": notes}))
        return
    print(title)
    print(format_table(header, rows))
    for note in notes:
        print(f"  {note}")
    print("ratios: " + ", ".join(f"{case}: {value:.1f}x" for case, value in ratios.items()))
