"""Shared fixtures: the tiny dataset of ``tiny.py`` written once per session, and a private
feature cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny import write_tiny_dtd


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dtd(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session", autouse=True)
def feature_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test (and every process it starts) caches image features in a temporary folder,
    never in the user's cache."""
    folder = tmp_path_factory.mktemp("feature-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDPGP_CACHE", str(folder))
        yield folder
