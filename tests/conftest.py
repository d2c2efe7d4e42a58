"""Shared test fixtures."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _beit_logger_as_it_was() -> Iterator[None]:
    """Each test finds the ``beit`` logger as the one before it did: its handlers (their levels and filters), level
    and propagation. ``setup_logging`` (any trainer run in-process) turns propagation off and adds handlers and, on
    a rank other than the first, a filter; a later test's ``caplog`` (which listens at the root) then depended on
    which tests ran before it."""
    logger = logging.getLogger("beit")
    handlers = list(logger.handlers)
    handler_state = [(h, h.level, list(h.filters)) for h in handlers]
    level, propagate = logger.level, logger.propagate
    yield
    for h in logger.handlers:
        if h not in handlers and isinstance(h, logging.FileHandler):
            h.close()
    logger.handlers[:] = handlers
    for h, h_level, filters in handler_state:
        h.setLevel(h_level)
        h.filters[:] = filters
    logger.setLevel(level)
    logger.propagate = propagate


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
