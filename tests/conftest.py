"""Shared test fixtures."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is ~20x faster than two fighting for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def beit_warnings() -> Iterator[list[logging.LogRecord]]:
    """Warnings logged under the ``beit`` logger (which stops propagating once a run has set up logging)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("beit")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
