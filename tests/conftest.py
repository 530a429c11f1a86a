"""Shared fixtures and the one GPU marker: tests marked cuda_only skip on machines without CUDA."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda_only" in item.keywords:
            item.add_marker(skip)
