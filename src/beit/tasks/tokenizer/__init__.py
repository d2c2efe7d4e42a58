"""The tokenizer task: train a dVAE on a folder of images, judge or apply any registered tokenizer.

The files every task package has: ``config`` (:class:`TokenizerTrainConfig`), ``data`` (training crops and
the held-out set), ``train`` (held-out evaluation, reconstruction grid and :func:`train_tokenizer` on the
shared engine), ``cli`` (the run functions of ``beit tokenizer train | eval | encode | convert``). No
``model``: the dVAE is built as ``DiscreteVAE(cfg.model)``. The tokenizer modules themselves and the one
``load_tokenizer`` registry live below, in :mod:`beit.tokenizers`.

Imports are lazy (``beit.tasks._lazy``) so that ``beit --help`` (which reads ``cli``) does not load the engine.
"""

from __future__ import annotations

from .._lazy import lazy_names

_WHERE = {
    "TokenizerTrainConfig": "config",
    "build_datasets": "data",
    "evaluate_tokenizer": "train", "main": "train", "round_trip_metrics": "train", "train_tokenizer": "train",
    "write_recon_grid": "train",
}

__all__ = sorted(_WHERE)

__getattr__ = lazy_names(__name__, _WHERE)
