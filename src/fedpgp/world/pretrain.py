"""Pretrain the small CLIP of the offline world (``fedpgp-world``) contrastively, on CPU.

Images: clean renders of the world's seen classes (every class except ``held_out_labels()``),
from a pool rendered once from the seed. Captions: one of ``TEMPLATES`` filled with the class
name, one per class of a batch and step; the long templates put the class name as far as
position 19 so that the positions where prompt learning puts it (after 16 context vectors) are
trained too. Loss: the symmetric contrastive (CLIP) loss between the images of a batch and the
captions of its classes, where a caption's positives are all the images of its class.
Everything random comes from the seed, so a run is reproducible on the same thread count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedpgp.backbone import BackboneSpec, FrozenCLIP
from fedpgp.data.world_images import MAX_CLASSES, WorldImages, class_names, held_out_labels
from fedpgp.world.model import (
    build_token_map,
    create_trainable_clip,
    save_clip_weights,
    tokenize_compact,
)
from fedpgp.world.settings import MODEL_NAME, PretrainSettings

ZERO_SHOT_TEMPLATE = "a photo of a {}."

# "{}" is the class name; positions of its first token range from 1 to 19.
TEMPLATES: tuple[str, ...] = (
    "{}.",
    "a {}.",
    "one {}.",
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a small photo of a {}.",
    "a {} on a grey background.",
    "there is one {} in this picture.",
    "a low resolution photo of a {}.",
    "this is a picture of a {}.",
    "in this small picture there is one {}.",
    "a blurry and noisy low resolution photo of a {}.",
    "this is one of my pictures, it shows a {}.",
    "a photo that was taken with a small camera and that shows a {}.",
    "there is a picture here, it is small and noisy and it shows a {}.",
    "i took a small photo with my old camera and in the photo there is a {}.",
    "this is a low resolution picture that i made with my camera, and it shows one {}.",
    "this is a small and low resolution picture with some noise and a grey background that "
    "shows a {}.",
)
# Words the model must know besides the captions: "X" fills the placeholder prompt
# "X X .. X {class}." of the authors' code (docs/method.md section 6, fedpgp.anchor: official).
EXTRA_WORDS = ("x",)


@dataclass(frozen=True)
class PretrainResult:
    """What a pretraining run produced."""

    path: Path
    sha256: str
    seconds: float  # wall clock of training and writing
    cpu_seconds: float  # CPU time of the same, all threads: a measure immune to other load
    accuracy: dict[str, float]


def vocabulary_texts() -> list[str]:
    """Every text whose words the world model must know: the captions and the extra words."""
    names = class_names()
    return [template.format(name) for template in TEMPLATES for name in names] + list(EXTRA_WORDS)


def world_token_map(vocab_size: int) -> Tensor:
    """The compact vocabulary of the world model (see ``fedpgp.world.model.build_token_map``)."""
    return build_token_map(vocabulary_texts(), vocab_size)


def _caption_ids(token_map: Tensor) -> Tensor:
    """Token ids of every (template, class): (templates, classes, context length)."""
    names = class_names()
    texts = [template.format(name) for template in TEMPLATES for name in names]
    ids = tokenize_compact(MODEL_NAME, texts, token_map)
    return ids.view(len(TEMPLATES), len(names), -1)


def _normalise(images: Tensor, model: nn.Module) -> Tensor:
    """uint8 (N, H, W, 3) -> the float input the CLIP expects (N, 3, H, W)."""
    config = model.visual.preprocess_cfg
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def contrastive_loss(
    image_features: Tensor, text_features: Tensor, classes: Tensor, scale: Tensor
) -> Tensor:
    """Symmetric CLIP loss between images and one caption per class present in the batch.

    ``classes[i]`` is the row of ``text_features`` that describes image ``i``; a caption's
    positives are all the images of its class.
    """
    logits = scale * image_features @ text_features.T
    image_to_text = F.cross_entropy(logits, classes)
    positive = F.one_hot(classes, text_features.shape[0]).T.float()
    log_probs = F.log_softmax(logits.T, dim=1)
    text_to_image = -((positive * log_probs).sum(dim=1) / positive.sum(dim=1)).mean()
    return (image_to_text + text_to_image) / 2


def _optimizer(model: nn.Module, settings: PretrainSettings) -> torch.optim.Optimizer:
    # No weight decay on gains, biases, embeddings and the temperature, as in CLIP.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        plain = param.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if plain else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.learning_rate, betas=(0.9, 0.98), eps=1e-6)


def _learning_rate(step: int, settings: PretrainSettings) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def seen_labels() -> np.ndarray:
    """Labels of the classes that pretraining sees."""
    held_out = set(held_out_labels())
    return np.array([k for k in range(MAX_CLASSES) if k not in held_out], dtype=np.int64)


def train_world_clip(
    settings: PretrainSettings, log: Callable[[str], None] = print
) -> tuple[nn.Module, Tensor]:
    """Train the world CLIP from scratch; returns the model (fp32) and its token map."""
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _train(settings, log)
    finally:
        torch.set_num_threads(threads)


def _train(settings: PretrainSettings, log: Callable[[str], None]) -> tuple[nn.Module, Tensor]:
    start = time.perf_counter()
    model = create_trainable_clip(MODEL_NAME, settings.seed)
    token_map = world_token_map(model.token_embedding.num_embeddings)
    captions = _caption_ids(token_map)

    pool_labels = np.repeat(seen_labels(), settings.pool_per_class)
    pool = WorldImages(pool_labels, seed=settings.seed, stream="pretrain").array()
    pool_images = torch.from_numpy(pool)
    pool_classes = torch.from_numpy(pool_labels)
    log(
        f"rendered {len(pool_labels)} images of {len(seen_labels())} seen classes "
        f"({time.perf_counter() - start:.0f} s)"
    )

    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = _optimizer(model, settings)
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, settings)
        index = torch.randint(len(pool_labels), (settings.batch_size,), generator=generator)
        images = pool_images[index]
        flip = torch.rand(settings.batch_size, generator=generator) < 0.5
        images[flip] = images[flip].flip(dims=[2])
        # One caption per class in the batch, in a template drawn per class and step.
        present, classes = pool_classes[index].unique(return_inverse=True)
        template = torch.randint(len(TEMPLATES), (len(present),), generator=generator)
        image_features = model.encode_image(_normalise(images, model), normalize=True)
        text_features = model.encode_text(captions[template, present], normalize=True)
        loss = contrastive_loss(image_features, text_features, classes, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            elapsed = time.perf_counter() - start
            log(f"step {step + 1}/{settings.steps}  loss {loss.item():.4f}  ({elapsed:.0f} s)")
    return model.eval(), token_map


@torch.no_grad()
def zero_shot_accuracy(
    backbone: FrozenCLIP, per_class: int = 20, seed: int = 0, template: str = ZERO_SHOT_TEMPLATE
) -> dict[str, float]:
    """Zero-shot top-1 accuracy (%) over all 90 classes on clean test images of the world,
    split into the classes seen in pretraining, those held out, and all."""
    labels = np.repeat(np.arange(MAX_CLASSES), per_class)
    images = torch.from_numpy(WorldImages(labels, seed=seed, stream="test").array())
    text = backbone.encode_texts([template.format(name) for name in class_names()])
    features = torch.cat(
        [backbone.encode_images(_normalise(chunk, backbone.model)) for chunk in images.split(512)]
    )
    correct = (features @ text.T).argmax(dim=1).numpy() == labels
    held_out = np.isin(labels, held_out_labels())
    return {
        "seen": float(correct[~held_out].mean() * 100),
        "held_out": float(correct[held_out].mean() * 100),
        "all": float(correct.mean() * 100),
    }


def pretrain(
    out: Path, settings: PretrainSettings, log: Callable[[str], None] = print
) -> PretrainResult:
    """Train, write the weights to ``out`` atomically, and measure zero-shot accuracy on the
    file as written (fp16), loaded the way every run loads it."""
    start, start_cpu = time.perf_counter(), time.process_time()
    model, token_map = train_world_clip(settings, log)
    metadata = {"made_by": "fedpgp world pretrain", "settings": repr(settings)}
    sha256 = save_clip_weights(model, out, token_map, metadata)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    backbone = FrozenCLIP.load(BackboneSpec(name=MODEL_NAME, pretrained=None, file=str(out)))
    accuracy = zero_shot_accuracy(backbone, settings.eval_per_class)
    return PretrainResult(Path(out), sha256, seconds, cpu_seconds, accuracy)
