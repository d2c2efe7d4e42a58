"""The tokenizer task: train a dVAE on a folder of images, judge or apply any registered tokenizer.

``train``: :class:`TokenizerTrainConfig` and :func:`train_tokenizer` (on the shared engine).
``cli``: the run functions of ``beit tokenizer train | eval | encode | convert``. The tokenizer
modules themselves and the one ``load_tokenizer`` registry live below, in :mod:`beit.tokenizers`.

Nothing is imported here, so that ``beit --help`` (which reads ``cli``) does not load the engine:
``from beit.tasks.tokenizer.train import train_tokenizer``.
"""
