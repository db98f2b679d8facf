"""Class names are spelled one way on every path: the loaders (through DatasetSplits), a
PromptBank built directly, and class-name files all give the same prompt."""

from __future__ import annotations

import numpy as np
import torch

from fedpgp.backbone import BackboneSpec, FrozenCLIP
from fedpgp.data import ArrayImages, DatasetSplits, LabeledSet
from fedpgp.data.datasets import normalize_classname
from fedpgp.prompts import PromptBank


def test_names_are_normalised_once_for_every_path() -> None:
    assert normalize_classname("  ice_cream ") == "ice cream"
    assert normalize_classname("wine__glass\tred") == "wine glass red"
    tiny = FrozenCLIP.load(BackboneSpec("fedpgp-tiny", None))
    raw = ["ice_cream", "wine_glass", " sea  lion "]
    direct = PromptBank(tiny, raw, n_ctx=2)
    spelled = PromptBank(tiny, ["ice cream", "wine glass", "sea lion"], n_ctx=2)
    assert direct.classnames == spelled.classnames == ["ice cream", "wine glass", "sea lion"]
    context = torch.randn(2, tiny.text_width, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(direct.encode(context), spelled.encode(context), rtol=0, atol=0)
    images = ArrayImages(np.zeros((3, 8, 8, 3), dtype=np.uint8))
    labeled = LabeledSet(images, np.array([0, 1, 2]))
    splits = DatasetSplits("names", raw, labeled, labeled)
    assert splits.classnames == direct.classnames
