"""The rooms of the package and their one-way order: the one place it is written down.

A room is a top-level subpackage or module of ``beit``. Code in a room may import the rooms on a
strictly lower level, never its own level's neighbours nor anything higher (lazy imports inside
functions count too). ``tests/test_rooms.py`` enforces this with the AST of every file under
``src/beit``; ``docs/ARCHITECTURE.md`` explains it.

====  =============================================  ==============================================
lvl   rooms                                          what they are
====  =============================================  ==============================================
-1    ``_text``                                      plain-text helpers for messages (``first_few``);
                                                     imports nothing of beit, every room may use it
0     models, tokenizers, data, configs, rooms       the ViT, visual tokenizers, datasets/transforms/
                                                     masking, YAML presets; none knows another
1     interop                                        checkpoint formats, ``build_backbone``
2     engine, ``beit/__init__`` (the package root)   the one trainer; the root re-exports levels 0-1
3     tasks                                          pretrain, finetune/probe/evaluate, segment, layout,
                                                     tokenizer training, demo
4     cli                                            the ``beit`` command table
5     ``__main__``                                   ``python -m beit``
====  =============================================  ==============================================
"""

from __future__ import annotations

ROOM_LEVELS: dict[str, int] = {
    "_text": -1,
    "models": 0,
    "tokenizers": 0,
    "data": 0,
    "configs": 0,
    "rooms": 0,
    "interop": 1,
    "engine": 2,
    "__init__": 2,
    "tasks": 3,
    "cli": 4,
    "__main__": 5,
}


def may_import(importer: str, imported: str) -> bool:
    """Whether code in room ``importer`` may import room ``imported`` (a room always imports itself).

    Raises ``KeyError`` naming the room when either is not in :data:`ROOM_LEVELS` (a new top-level
    module must be given a level here first).
    """
    for room in (importer, imported):
        if room not in ROOM_LEVELS:
            raise KeyError(f"{room!r} is not a room of beit: add it to beit/rooms.py ROOM_LEVELS")
    return importer == imported or ROOM_LEVELS[imported] < ROOM_LEVELS[importer]
