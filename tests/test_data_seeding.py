"""Per-sample seeding: augmentation is a pure function of (seed, epoch, index); caller RNGs untouched."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from beit.data.seeding import derive_seed, generator_for, seeded, stable_index
from beit.data.transforms import build_finetune_transform


def _draw() -> tuple[float, float, float, int]:
    return (torch.rand(()).item(), random.random(), float(np.random.rand()), torch.randint(0, 10**9, ()).item())


def test_same_triple_same_draws_and_neighbours_differ() -> None:
    with seeded(0, 1, 2):
        a = _draw()
    with seeded(0, 1, 2):
        b = _draw()
    assert a == b
    others = []
    for triple in [(0, 2, 2), (0, 1, 3), (1, 1, 2), (0, 2, 1)]:
        with seeded(*triple):
            others.append(_draw())
    for o in others:
        assert all(x != y for x, y in zip(a, o))
    assert len({derive_seed(0, e, i) for e in range(20) for i in range(50)}) == 1000


def test_caller_rng_streams_untouched() -> None:
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    expected = [_draw() for _ in range(3)]

    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    first = _draw()
    with seeded(7, 0, 5):
        _draw()
    second = _draw()
    with pytest.raises(RuntimeError):
        with seeded(7, 0, 6):
            _draw()
            raise RuntimeError("boom")  # states are restored even when the block fails
    third = _draw()
    assert [first, second, third] == expected


def test_nested_and_generator_for() -> None:
    with seeded(0, 0, 0) as g_outer:
        x = torch.rand(3)
        with seeded(0, 0, 1):
            torch.rand(3)
        y = torch.rand(3)  # the inner block restored the outer stream
        gen_draw = torch.rand(2, generator=g_outer)
    with seeded(0, 0, 0):
        assert torch.equal(torch.rand(6), torch.cat([x, y]))
    g1, g2 = generator_for(3, 1, 4), generator_for(3, 1, 4)
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))
    assert not torch.equal(torch.rand(5, generator=generator_for(3, 1, 5)), torch.rand(5, generator=g2))
    assert gen_draw.shape == (2,)


def test_in_a_worker_the_outer_block_only_seeds_and_nested_blocks_still_restore(monkeypatch) -> None:
    import beit.data.seeding as S

    with seeded(0, 0, 0):
        main_draws = [_draw(), _draw()]
        with seeded(0, 0, 1):
            _draw()
        main_after_inner = _draw()  # the inner block restored the outer stream
    monkeypatch.setattr(S, "get_worker_info", lambda: object())  # as inside a DataLoader worker
    torch.manual_seed(5)
    with seeded(0, 0, 0):
        assert [_draw(), _draw()] == main_draws  # the same draws: the sample does not depend on where it is made
        with seeded(0, 0, 1):
            _draw()
        assert _draw() == main_after_inner  # a nested block restores, in a worker too
        inside = torch.random.get_rng_state()
    assert torch.equal(torch.random.get_rng_state(), inside)  # the outer one did not restore (nothing to keep)
    with pytest.raises(RuntimeError):  # the nesting count survives an exception
        with seeded(0, 0, 2):
            raise RuntimeError("boom")
    assert S._open.depth == 0


def test_invalid_and_stable_index() -> None:
    with pytest.raises(ValueError, match="epoch"):
        derive_seed(0, -1, 0)
    assert stable_index("abc") == stable_index("abc") != stable_index("abd")
    assert 0 <= stable_index("x") < 2**63


def test_timm_randaugment_pipeline_is_pure() -> None:
    """timm draws from Python random and NumPy, torchvision from torch: all three are covered."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    tf = build_finetune_transform(True, 32)
    outs = {}
    for epoch in (0, 0, 1):
        with seeded(0, epoch, 3):
            outs.setdefault(epoch, []).append(tf(img))
    assert torch.equal(outs[0][0], outs[0][1])
    assert not torch.equal(outs[0][0], outs[1][0])


def test_eval_transforms_are_marked_deterministic_and_datasets_skip_seeding_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The eval transforms draw nothing, so the datasets call them without seeded() (its RNG save/restore costs as
    much as a small image's transform); the same tensors come out. A training transform, or an unmarked Compose
    built from a marked one's steps, is still seeded."""
    from torchvision import transforms as T

    import beit.data.datasets as datasets_mod
    import beit.data.seeding as seeding_mod
    from beit.data.datasets import TensorImageDataset
    from beit.data.seeding import deterministic, is_deterministic
    from beit.data.transforms import build_eval_transform, build_full_image_transform
    from beit.models.config import Preprocess
    from beit.tasks.classify.data import build_preprocess

    ev = build_eval_transform(16)
    assert is_deterministic(ev)
    assert is_deterministic(build_full_image_transform(False, 16))
    assert is_deterministic(build_full_image_transform(True, 16))  # no flip, no erasing: nothing random
    assert not is_deterministic(build_full_image_transform(True, 16, hflip=0.5))
    assert not is_deterministic(build_finetune_transform(True, 16, auto_augment=None, re_prob=0.0))
    assert is_deterministic(build_preprocess(Preprocess(img_size=16, grayscale=True)))  # behind the gray step
    from beit.tasks.tokenizer.data import eval_transform

    assert is_deterministic(eval_transform(16))  # the tokenizer's held-out images (training and `tokenizer eval`)
    assert not is_deterministic(T.Compose(list(ev.transforms)))  # a new Compose is unmarked until marked
    assert deterministic(T.Compose([])) is not None

    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    seeded_ds = TensorImageDataset(images, [0, 1, 2, 3], T.Compose(list(ev.transforms)))  # unmarked: seeded
    expected = [seeded_ds[i][0] for i in range(4)]

    calls = []
    real = seeding_mod.seeded

    def counting(*args: int):  # noqa: ANN202
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(seeding_mod, "seeded", counting)
    monkeypatch.setattr(datasets_mod, "seeded", counting)
    marked = TensorImageDataset(images, [0, 1, 2, 3], ev)
    for i in range(4):
        assert torch.equal(marked[i][0], expected[i])
    assert calls == []
    TensorImageDataset(images, [0, 1, 2, 3], build_finetune_transform(True, 16, auto_augment=None, re_prob=0.0))[0]
    assert len(calls) == 1
