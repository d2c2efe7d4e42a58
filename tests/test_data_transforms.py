"""Pre-training views, fine-tune/eval transforms and the GPU fast path (run on CPU here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from beit.data.gpu_augment import PretrainViews
from beit.data.masking import BlockwiseMaskGenerator
from beit.data.seeding import seeded
from beit.data.transforms import (
    PretrainTransform,
    build_eval_transform,
    build_finetune_transform,
    build_linear_probe_transform,
    collate_pretrain,
    default_mask_generator,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _gradient_image(w: int = 256, h: int = 192) -> Image.Image:
    """R grows left to right, G top to bottom: any crop box / flip is readable from the pixels."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    arr = np.stack([x, y, np.full_like(x, 60)], -1).round().astype(np.uint8)
    return Image.fromarray(arr)


def _random_image(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size,patch,down,tok,grid", [(224, 16, 8, 112, 14), (32, 4, 4, 32, 8), (32, 4, 2, 16, 8)])
def test_view_sizes_ranges_and_mask_budget(size: int, patch: int, down: int, tok: int, grid: int) -> None:
    tf = PretrainTransform(size, patch, down)
    img = _random_image(300, 260)
    for i in range(4):
        with seeded(0, 0, i):
            out = tf(img)
        assert out["image"].shape == (3, size, size) and out["image"].dtype == torch.float32
        assert out["tok_image"].shape == (3, tok, tok)
        assert 0.0 <= out["tok_image"].min() and out["tok_image"].max() <= 1.0
        assert out["mask"].shape == (grid, grid) and out["mask"].dtype == torch.bool
        assert 0 < int(out["mask"].sum()) <= tf.mask_generator.num_masking_patches
    assert tf.tokenizer_size == (tok, tok)


def test_official_mask_budget_respected() -> None:
    gen = BlockwiseMaskGenerator(14, num_masking_patches=75, min_num_patches=16)
    tf = PretrainTransform(224, 16, 8, mask_generator=gen)
    img = _random_image(64, 64)
    counts = []
    for i in range(20):
        with seeded(1, 0, i):
            counts.append(int(tf(img)["mask"].sum()))
    assert max(counts) <= 75 and min(counts) > 0
    assert default_mask_generator(14).num_masking_patches == 75


def test_two_views_share_crop_box_and_flip() -> None:
    tf = PretrainTransform(224, 16, 8, color_jitter=0.0, scale=(0.1, 0.6))
    img = _gradient_image()
    flips = set()
    for i in range(12):
        with seeded(0, 0, i):
            out = tf(img)
        patch = (out["image"] * STD + MEAN).clamp(0, 1)
        # the patch view, shrunk to the tokenizer size, must match the tokenizer view pixel for pixel
        shrunk = F.interpolate(patch[None], size=(112, 112), mode="area")[0]
        assert (shrunk - out["tok_image"]).abs().mean() < 0.01, i
        # both views flip together: R (x position) decreases left to right on flipped samples
        d_patch = float(patch[0, :, -1].mean() - patch[0, :, 0].mean())
        d_tok = float(out["tok_image"][0, :, -1].mean() - out["tok_image"][0, :, 0].mean())
        assert np.sign(d_patch) == np.sign(d_tok) != 0
        flips.add(d_patch < 0)
    assert flips == {True, False}  # both cases were exercised


def test_pretrain_transform_deterministic_under_seed() -> None:
    tf = PretrainTransform(32, 4, 4)
    img = _random_image(40, 40)
    with seeded(5, 2, 9):
        a = tf(img)
    with seeded(5, 2, 9):
        b = tf(img)
    with seeded(5, 3, 9):
        c = tf(img)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["image"], c["image"])


def test_pretrain_transform_validation() -> None:
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        PretrainTransform(225, 16)
    with pytest.raises(ValueError, match="does not match"):
        PretrainTransform(224, 16, mask_generator=BlockwiseMaskGenerator(8, num_masking_patches=20))
    with pytest.raises(ValueError, match="scale"):
        PretrainTransform(scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="ratio"):
        PretrainTransform(ratio=(2.0, 1.0))
    with pytest.raises(ValueError, match="hflip"):
        PretrainTransform(hflip=2)
    with pytest.raises(ValueError, match="tokenizer_downsample"):
        PretrainTransform(tokenizer_downsample=0)
    with pytest.raises(ValueError, match="interpolation"):
        PretrainTransform(interpolation="cubic")
    with pytest.raises(TypeError):
        PretrainTransform(32, 4, 4)(torch.zeros(3, 32, 32))


def test_finetune_and_eval_transforms() -> None:
    img = _random_image(300, 256)
    tf = build_finetune_transform(True, 224)
    with seeded(0, 0, 0):
        assert tf(img).shape == (3, 224, 224)
    small = build_finetune_transform(True, 32)
    assert isinstance(small.transforms[0], T.RandomCrop)
    with seeded(0, 0, 0):
        assert small(_random_image(32, 32)).shape == (3, 32, 32)
    ev = build_finetune_transform(False, 224)
    assert ev.transforms[0].size == 256  # 224 / (224/256)
    assert ev(img).shape == (3, 224, 224)
    ev32 = build_eval_transform(32)
    assert ev32.transforms[0].size == 32  # crop_pct 1.0: no resize-up-then-crop
    x = _random_image(32, 32)
    expected = (T.ToTensor()(x) - MEAN) / STD
    torch.testing.assert_close(ev32(x), expected)
    with pytest.raises(ValueError, match="crop_pct"):
        build_eval_transform(224, crop_pct=1.5)
    lp = build_linear_probe_transform(True, 224)
    with seeded(0, 0, 0):
        assert lp(img).shape == (3, 224, 224)
    assert build_linear_probe_transform(False, 64)(img).shape == (3, 64, 64)


def test_torchvision_autoaugment_policy_takes_randaugments_place() -> None:
    """``auto_augment="autoaugment-cifar10"``: torchvision's CIFAR-10 policy after the crop and flip, no colour
    jitter, filled with the mean; the draws follow the sample's seed like the rest of the recipe."""
    tf = build_finetune_transform(True, 32, auto_augment="autoaugment-cifar10", re_prob=0.0)
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ["SmallImageRandomCrop", "RandomHorizontalFlip", "AutoAugment", "MaybeToTensor",
                     "Normalize"], names  # re_prob 0: no erasing
    aug = tf.transforms[2]
    assert aug.policy == T.AutoAugmentPolicy.CIFAR10 and aug.fill == [124, 116, 104]
    img = _random_image(32, 32)
    with seeded(0, 0, 1):
        a = tf(img)
    with seeded(0, 0, 1):
        b = tf(img)
    outs = []
    for i in range(8):
        with seeded(0, 0, i):
            outs.append(tf(img))
    assert torch.equal(a, b) and len({o.numpy().tobytes() for o in outs}) == 8
    # the same draws without the policy: the policy changed the pixels (not a no-op slot)
    plain = build_finetune_transform(True, 32, auto_augment=None, color_jitter=0.0, re_prob=0.0)
    assert sum(not torch.equal(o, _plain(plain, img, i)) for i, o in enumerate(outs)) >= 4
    imagenet = build_finetune_transform(True, 224, auto_augment="autoaugment-imagenet")
    assert [type(t).__name__ for t in imagenet.transforms][2] == "AutoAugment"
    assert not any(isinstance(t, T.ColorJitter) for t in imagenet.transforms)


def _plain(tf, img, i):
    with seeded(0, 0, i):
        return tf(img)


# The batched views of a PretrainTransform's recipe are beit.data.gpu_augment.PretrainViews (the old
# transforms.gpu_pretrain_views is gone); these check that the recipe carries over through from_transform.
def _views(cfg: PretrainTransform, images_hwc: torch.Tensor, epoch: int = 0, masks=None) -> dict:
    views = PretrainViews.from_transform(cfg, seed=0)
    return views(images_hwc.permute(0, 3, 1, 2).contiguous(), torch.arange(len(images_hwc)), epoch, masks)


def test_gpu_views_shapes_ranges_determinism() -> None:
    cfg = PretrainTransform(32, 4, 2)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    a, b, c = _views(cfg, images), _views(cfg, images), _views(cfg, images, epoch=1)
    assert a["image"].shape == (6, 3, 32, 32) and a["tok_image"].shape == (6, 3, 16, 16)
    assert 0 <= a["tok_image"].min() and a["tok_image"].max() <= 1
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["image"], c["image"])


def test_gpu_views_geometry_matches_identity_and_flip() -> None:
    """Full-image crop at the input size samples exact pixel centres: output == input (or its mirror)."""
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    src = images.permute(0, 3, 1, 2).float() / 255
    for hflip, expected in [(0.0, src), (1.0, src.flip(-1))]:
        cfg = PretrainTransform(32, 4, 4, scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=0, hflip=hflip)
        out = _views(cfg, images)
        torch.testing.assert_close(out["tok_image"], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(out["image"], (expected - MEAN) / STD, atol=1e-4, rtol=0)
    # the PIL path agrees on this identity crop
    cfg = PretrainTransform(32, 4, 4, scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=0, hflip=0)
    with seeded(0, 0, 0):
        pil = cfg(Image.fromarray(images[0].numpy()))
    torch.testing.assert_close(pil["tok_image"], src[0], atol=1e-6, rtol=0)


def test_collate_pretrain() -> None:
    tf = PretrainTransform(32, 4, 4)
    img = _random_image(40, 40)
    samples = []
    for i in range(3):
        with seeded(0, 0, i):
            samples.append(tf(img))
    out = collate_pretrain(samples)
    assert out["image"].shape == (3, 3, 32, 32) and out["mask"].shape == (3, 8, 8)
    out = collate_pretrain([(s, i) for i, s in enumerate(samples)])
    assert out["label"].tolist() == [0, 1, 2]
    out = collate_pretrain([(s["image"], s["tok_image"], s["mask"]) for s in samples])
    assert out["tok_image"].shape == (3, 3, 32, 32)


def test_gpu_views_with_masks_drawn_in_the_dataset() -> None:
    """The fast path's recommended use: masks drawn per sample by the dataset, views on the batch."""
    from torch.utils.data import DataLoader

    from beit.data.datasets import TensorImageDataset

    cfg = PretrainTransform(32, 4, 4)
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    ds = TensorImageDataset(images, labels=list(range(8)), mask_generator=cfg.mask_generator, seed=1)
    s0, s0b = ds[0][0], ds[0][0]
    assert torch.equal(s0["mask"], s0b["mask"]) and torch.equal(s0["image"], images[0])
    batch, labels = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["mask"].shape == (4, 8, 8)
    out = _views(cfg, batch["image"], masks=batch["mask"])
    assert torch.equal(out["mask"], batch["mask"]) and labels.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="mask_generator"):
        TensorImageDataset(images, transform=cfg, mask_generator=cfg.mask_generator)


def test_randaugment_posterize_to_zero_bits_does_not_crash() -> None:
    """RandAugment's PosterizeIncreasing can ask for 0 bits; recent Pillow raises there (mid-epoch crash)."""
    from PIL import Image
    from timm.data import auto_augment as aa

    from beit.data.transforms import build_finetune_transform

    t = build_finetune_transform(True, 32)
    ra = next(x for x in t.transforms if isinstance(x, aa.RandAugment))
    op = next(o for o in ra.ops if o.aug_fn.__name__ == "_posterize_zero_safe")
    img = Image.new("RGB", (32, 32), (200, 100, 50))
    assert op.aug_fn(img, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert op.aug_fn(img, 8) is img


def test_full_image_transform_is_the_document_recipe() -> None:
    """Whole page to a square (no crop): eval is deterministic; train adds only flip and erasing."""
    from beit.data import build_full_image_transform, interpolation_mode

    img = _gradient_image(80, 40)
    ev = build_full_image_transform(False, 32, hflip=1.0, re_prob=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = ev(img)
    assert x.shape == (3, 32, 32) and [type(t).__name__ for t in ev.transforms] == ["Resize", "ToTensor", "Normalize"]
    assert x[0, :, 0].mean() < x[0, :, -1].mean()  # the whole width kept: R still grows left to right
    tr = build_full_image_transform(True, 32, hflip=1.0, re_prob=0.5, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert [type(t).__name__ for t in tr.transforms] == ["Resize", "RandomHorizontalFlip", "ToTensor", "Normalize",
                                                         "RandomErasing"]
    torch.testing.assert_close(T.Compose(tr.transforms[:4])(img), x.flip(-1))
    assert interpolation_mode("bilinear") is T.InterpolationMode.BILINEAR
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'; choose from"):
        interpolation_mode("cubic")
    with pytest.raises(ValueError, match="re_prob is a probability, got 2"):
        build_full_image_transform(True, 32, re_prob=2)


@pytest.mark.parametrize("size, padding, pad", [(32, None, 4), (16, None, 2), (24, None, 3), (8, None, 1),
                                                (16, 0, 0), (16, 3, 3)])
def test_small_image_crop_shifts_by_an_eighth_of_the_side_on_both_paths(size, padding, pad) -> None:
    """<= 32 px: RandomCrop(size, padding=size // 8), unilm's CIFAR crop at 32 px, or the ``crop_padding`` given
    (0: no shift); the GPU path shifts alike. A single lit pixel in the middle lands anywhere within +-pad of
    where it was, never farther."""
    from beit.data.gpu_augment import FinetuneAugment

    img = np.zeros((size, size, 3), np.uint8)
    c = size // 2
    img[c, c] = 255
    tf = build_finetune_transform(True, size, auto_augment=None, color_jitter=0.0, re_prob=0.0, hflip=0.0,
                                  mean=(0, 0, 0), std=(1, 1, 1), crop_padding=padding)
    crop = tf.transforms[0]
    assert isinstance(crop, T.RandomCrop) and crop.padding == pad
    cpu = set()
    for i in range(300):
        with seeded(0, 0, i):
            out = tf(Image.fromarray(img))
        r, q = divmod(int(out[0].argmax()), size)
        cpu.add((r - c, q - c))
    aug = FinetuneAugment(size, auto_augment=None, re_prob=0.0, hflip=0.0, mean=(0, 0, 0), std=(1, 1, 1), seed=0,
                          crop_padding=padding)
    batch = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).expand(300, -1, -1, -1).contiguous()
    gout = aug(batch, torch.arange(300), 0)
    gpu = {(int(i) // size - c, int(i) % size - c) for i in gout[:, 0].flatten(1).argmax(1)}
    full = {(dr, dq) for dr in range(-pad, pad + 1) for dq in range(-pad, pad + 1)}
    for shifts in (cpu, gpu):
        assert shifts <= full  # never farther than the padding
        assert {r for r, _ in shifts} == {q for _, q in shifts} == set(range(-pad, pad + 1))  # every shift occurs


def test_negative_or_huge_crop_padding_is_refused() -> None:
    from beit.data.gpu_augment import FinetuneAugment
    from beit.tasks.classify import DataConfig, FinetuneConfig

    with pytest.raises(ValueError, match="crop_padding must be >= 0"):
        build_finetune_transform(True, 16, crop_padding=-1)
    with pytest.raises(ValueError, match="must be >= 0 or null"):
        DataConfig(train_dir="x", crop_padding=-2).validate()
    # more than half the side: crops of mostly padding (10**9 once reached PIL and ran out of memory)
    with pytest.raises(ValueError, match=r"crop_padding must be <= input_size // 2 \(8 at 16 px\), got 9"):
        build_finetune_transform(True, 16, crop_padding=9)
    with pytest.raises(ValueError, match=r"crop_padding must be <= input_size // 2"):
        FinetuneAugment(16, crop_padding=10**9)
    with pytest.raises(ValueError, match=r"data.crop_padding.*must be <= img_size // 2 \(8 at img_size 16\), got 100"):
        FinetuneConfig(model="beit_tiny_patch16_224", img_size=16,
                       data=DataConfig(train_dir="x", crop_padding=100)).validate()
    FinetuneConfig(model="beit_tiny_patch16_224", img_size=64, data=DataConfig(train_dir="x", crop_padding=100)).validate()


def test_crop_padding_where_it_does_not_apply_is_named_in_a_warning() -> None:
    import logging

    from beit.tasks.classify import DataConfig
    from beit.tasks.classify.data import build_train_transform

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # the "beit" logger may not propagate (a trainer ran earlier in this process)
    log = logging.getLogger("beit.tasks.classify.data")
    log.addHandler(handler)
    try:
        build_train_transform(DataConfig(train_dir="x", crop_padding=2, auto_augment=None), 64)
        build_train_transform(DataConfig(train_dir="x", crop_padding=2, auto_augment=None), 16)
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "data.crop_padding=2 is ignored: it applies to the padded random crop of img_size <= 32 "
        "(this run: img_size 64, resize=crop)"]
