"""Shared fixtures. Tests never touch the user's ~/.cache/tether: TETHER_HOME points at a
per-session temporary folder (set before anything reads it)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _tether_home(tmp_path_factory):
    previous = os.environ.get("TETHER_HOME")
    if not os.environ.get("TETHER_TEST_KEEP_HOME"):
        os.environ["TETHER_HOME"] = str(tmp_path_factory.mktemp("tether_home"))
    os.environ.setdefault("TETHER_QUIET", "1")
    yield
    if previous is None:
        os.environ.pop("TETHER_HOME", None)
    else:
        os.environ["TETHER_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_path(_tether_home) -> str:
    """Folder of the zoo's tiny model (built once per session)."""
    from tether.zoo import pull

    return str(pull("tiny"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    from tether.models import load_tokenizer

    return load_tokenizer(tiny_path)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
