"""The batched on-device data path (beit.data.gpu_decode / gpu_augment), run on CPU tensors and checked
against the CPU path (PIL, torchvision, timm) it replaces."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from beit.data.datasets import NoReadableImagesError
from beit.data.gpu_augment import (
    FinetuneAugment,
    PretrainViews,
    _apply_op,
    _mix,
    crop_box,
    crop_boxes,
    per_sample_uniforms,
    resized_crops,
    sample_uniforms,
)
from beit.data.gpu_decode import (
    BatchDecoder,
    EncodedImageFiles,
    FinetunePipeline,
    InMemoryIndices,
    PretrainPipeline,
    collate_encoded,
    use_device_path,
)
from beit.data.masking import BlockwiseMaskGenerator
from beit.tasks.device_data import decode_summary

pytestmark = pytest.mark.usefixtures("one_thread")


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def _smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).copy()


# ------------------------------------------------------------------------------------------ random numbers
def test_uniforms_are_splitmix64_and_a_function_of_seed_epoch_index():
    # the int64 tensor hash equals splitmix64's finaliser computed with Python integers (wrapping is exact)
    def ref(v: int) -> int:
        m = (1 << 64) - 1
        v &= m
        v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & m
        v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & m
        return v ^ (v >> 31)

    xs = [0, 1, 12345, -7, (1 << 62) + 3]
    got = _mix(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert [g & ((1 << 64) - 1) for g in got] == [ref(x) for x in xs]
    u = per_sample_uniforms(3, 2, torch.tensor([5, 9, 11]), 4)
    alone = per_sample_uniforms(3, 2, torch.tensor([9]), 4)
    assert torch.equal(u[1], alone[0])  # independent of the batch it lands in
    assert not torch.equal(per_sample_uniforms(3, 3, torch.tensor([9]), 4), alone)  # new epoch, new numbers
    assert not torch.equal(per_sample_uniforms(3, 2, torch.tensor([9]), 4, stream=1), alone)
    big = per_sample_uniforms(0, 0, torch.arange(20000), 1).numpy().ravel()
    assert _ks(big, np.random.default_rng(0).random(20000)) < 0.02 and 0 <= big.min() and big.max() < 1


# ------------------------------------------------------------------------------------------ pre-training views
def test_crop_statistics_match_torchvision_random_resized_crop():
    H, W, n = 375, 500, 3000
    img = Image.new("RGB", (W, H))
    torch.manual_seed(0)
    ref = np.array([T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)], float)
    views = PretrainViews((224, 224), (112, 112), seed=1)
    p = views.params(torch.arange(n), 0, torch.full((n,), H), torch.full((n,), W))
    ours = p["box"].numpy().astype(float)
    area = lambda b: b[:, 2] * b[:, 3] / (H * W)  # noqa: E731
    aspect = lambda b: np.log(b[:, 3] / b[:, 2])  # noqa: E731
    assert _ks(area(ours), area(ref)) < 0.05  # ~1.6x the 5% critical value of n=3000
    assert _ks(aspect(ours), aspect(ref)) < 0.05
    assert _ks(ours[:, 0] / H, ref[:, 0] / H) < 0.05 and _ks(ours[:, 1] / W, ref[:, 1] / W) < 0.05
    assert (ours[:, 0] + ours[:, 2] <= H).all() and (ours[:, 1] + ours[:, 3] <= W).all()
    # and the test can fail: another scale range is far off
    other = PretrainViews((224, 224), (112, 112), scale=(0.3, 1.0)).params(
        torch.arange(n), 0, torch.full((n,), H), torch.full((n,), W))["box"].numpy().astype(float)
    assert _ks(area(other), area(ref)) > 0.2


def test_crop_fallback_is_torchvision_centre_crop():
    # a 10x1000 strip: no draw fits the ratio range, torchvision falls back to the largest centre crop
    u = torch.rand(4, 22, dtype=torch.float64)
    box = crop_boxes(torch.full((4,), 10), torch.full((4,), 1000), u, (0.9, 1.0), (3 / 4, 4 / 3))
    img = Image.new("RGB", (1000, 10))
    torch.manual_seed(0)
    assert box[0].tolist() == list(T.RandomResizedCrop.get_params(img, [0.9, 1.0], [3 / 4, 4 / 3]))


@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (3 / 4, 4 / 3)),
                                          ((0.5, 1.0), (0.5, 2.0))])
def test_one_samples_plain_python_box_is_the_batched_box(scale, ratio):
    """The workers' per-image box (``WorkerCrop``: ``sample_uniforms`` + ``crop_box``, plain Python) equals the
    batched tensor code's (what the views draw on the device) bit for bit: photos, tiny images, strips that
    take torchvision's fallback."""
    n = 3000
    for H, W in ((375, 500), (32, 32), (10, 1000), (1000, 10), (1, 1), (3, 4000)):
        u = per_sample_uniforms(5, 3, torch.arange(n), 22, stream=7)
        boxes = crop_boxes(torch.full((n,), H), torch.full((n,), W), u, scale, ratio).tolist()
        for i in range(0, n, 3):
            row = sample_uniforms(5, 3, i, 22, stream=7)
            assert row == u[i].tolist()
            assert list(crop_box(H, W, row, scale, ratio)) == boxes[i], (H, W, i)
    views = PretrainViews((224, 224), (112, 112), seed=4, scale=scale, ratio=ratio)
    p = views.params(torch.arange(50), 2, torch.full((50,), 375), torch.full((50,), 500))["box"].tolist()
    crop = views.worker_crop()
    assert [list(crop(i, 2, 375, 500)) for i in range(50)] == p
    with pytest.raises(ValueError, match="needs 22 uniforms"):
        crop_box(375, 500, row[:21])


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("max_bytes", [None, 400_000])
def test_batched_resized_crops_equal_interpolate_antialias_per_image(mixed, max_bytes, monkeypatch):
    """The two-matmul resize (JPEG path: a list of images, sizes may differ) gives what
    F.interpolate(bicubic, antialias=True) gives on each crop alone: downscaled, upscaled and mixed boxes,
    one chunk or several (padding chunks of mixed sizes)."""
    import beit.data.gpu_augment as GA

    if max_bytes is not None:
        monkeypatch.setattr(GA, "MAX_CHUNK_BYTES", max_bytes)
    g = torch.Generator().manual_seed(0)
    sizes = [(75, 100), (120, 90), (64, 64), (97, 131), (40, 50), (75, 100)] if mixed else [(75, 100)] * 6
    imgs = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    boxes = []
    for k, (h, w) in enumerate(sizes):
        bh, bw = (h, w) if k == 0 else (max(3, h // (k + 1)), max(3, w - 7 * k))  # whole image, then smaller
        boxes.append((int(torch.randint(0, h - bh + 1, (1,), generator=g)), int(torch.randint(0, w - bw + 1, (1,),
                     generator=g)), bh, bw))
    boxes_t = torch.tensor(boxes)
    outs = resized_crops(imgs, boxes_t, [(48, 40), (24, 24), (96, 80)])  # down, down, up (mostly)
    for out, size in zip(outs, [(48, 40), (24, 24), (96, 80)]):
        assert out.shape == (len(imgs), 3, *size)
        for k, ((t, left, bh, bw), im) in enumerate(zip(boxes, imgs)):
            ref = torch.nn.functional.interpolate(im[:, t:t + bh, left:left + bw][None].float(), size=size,
                                                  mode="bicubic", antialias=True, align_corners=False)[0]
            torch.testing.assert_close(out[k], ref, atol=2e-3, rtol=1e-5, msg=f"image {k} {size}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_resize_in_float16_stays_within_half_a_grey_level_and_fused_views_equal_eager():
    """On CUDA the resize multiplies in float16 (float32 accumulation) and the views' colour jitter runs
    compiled: both against the float32 / eager computation of the same batch."""
    import beit.data.gpu_augment as GA

    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in [(375, 500)] * 6 + [(300, 400)] * 2]
    views = PretrainViews((224, 224), (112, 112), seed=1)
    p = views.params(torch.arange(8), 0, torch.tensor([375] * 6 + [300] * 2), torch.tensor([500] * 6 + [400] * 2))
    cpu = resized_crops(imgs, p["box"], [(224, 224), (112, 112)])
    gpu = resized_crops([im.cuda() for im in imgs], p["box"], [(224, 224), (112, 112)])
    for c, d in zip(cpu, gpu):
        err = (d.cpu() - c).abs()
        assert err.max() < 0.5 and err.mean() < 0.05, (float(err.max()), float(err.mean()))
    per = torch.cat([p["flip"].view(-1, 1).float(), p["jitter"].float(), p["order"].float()], 1).cuda()
    mean, std = views.mean.cuda(), views.std.cuda()
    args = (gpu[0], gpu[1], per, mean, std, (True, True, True))
    fused = GA._finish_views(*args)
    assert GA._finish_views._compiled is not None and not GA._finish_views._failed
    for f, e in zip(fused, GA._finish_views_eager(*args)):
        torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("size", [32, 64])
def test_cuda_compiled_finetune_recipe_equals_eager(size):
    """On CUDA the fine-tuning recipe after the crop (flip, RandAugment, normalisation, erasing) runs as one
    compiled function: against the eager function on the same inputs. Rounding at 8-bit boundaries (posterize,
    solarize, equalize) may flip a few pixels; everything else agrees to float precision."""
    import beit.data.gpu_augment as GA

    g = torch.Generator().manual_seed(0)
    n = 64
    imgs = torch.randint(0, 256, (n, 3, 40, 48), generator=g, dtype=torch.uint8).cuda()
    aug = FinetuneAugment(size, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, seed=3)
    out = aug(imgs, torch.arange(n), 1)
    assert GA._finetune_finish._compiled is not None and not GA._finetune_finish._failed
    GA._finetune_finish._failed = True  # the same call, eagerly
    try:
        ref = aug(imgs, torch.arange(n), 1)
    finally:
        GA._finetune_finish._failed = False
    diff = (out - ref).abs()
    assert out.shape == (n, 3, size, size) and torch.isfinite(out).all()
    assert (diff > 1e-3).float().mean() < 0.005 and diff.mean() < 2e-3, (float((diff > 1e-3).float().mean()),
                                                                         float(diff.mean()))


@pytest.mark.parametrize("out", [1, 7, 112, 224])
def test_resize_weights_equal_interpolate_antialias_at_every_scale(out):
    """The banded resampling matrices (weights of each row's taps only, scattered into the zero matrix) give
    F.interpolate(bicubic, antialias=True) of every span: one pixel, upscales, ~1:1, and downscales up to 300x
    within one batch (the band's width follows the largest factor), spans touching either end."""
    from beit.data.gpu_augment import _aa_weights

    padded = 300
    start = torch.tensor([0, 0, 299, 10, 150, 0, 3, 290])
    length = torch.tensor([300, 1, 1, 2, 150, 233, 297, 10])
    w = _aa_weights(start, length, padded, out, torch.device("cpu"))
    assert w.shape == (len(start), out, padded)
    signal = torch.rand(len(start), padded, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for k in range(len(start)):
        s, n = int(start[k]), int(length[k])
        ref = torch.nn.functional.interpolate(signal[k, s:s + n].view(1, 1, 1, n), size=(1, out), mode="bicubic",
                                              antialias=True, align_corners=False).view(out)
        torch.testing.assert_close(w[k].double() @ signal[k], ref, atol=1e-5, rtol=1e-5, msg=f"span {s}+{n}")
        assert not w[k, :, :s].any() and not w[k, :, s + n:].any(), f"weight outside span {s}+{n}"


def test_resized_crops_of_a_batch_tensor_and_bad_boxes():
    """A [B, 3, H, W] batch (the in-memory path) gives the same per-crop result, upscales included (pixels
    outside the box never leak in); boxes outside their image and empty batches are named errors."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (5, 3, 32, 32), generator=g, dtype=torch.uint8)
    boxes = torch.tensor([[6, 6, 20, 20], [0, 0, 32, 32], [10, 3, 7, 29], [31, 31, 1, 1], [0, 16, 32, 16]])
    out = resized_crops(x, boxes, [(32, 32)])[0]
    for k, (t, left, h, w) in enumerate(boxes.tolist()):
        ref = torch.nn.functional.interpolate(x[k:k + 1, :, t:t + h, left:left + w].float(), size=(32, 32),
                                              mode="bicubic", antialias=True, align_corners=False)[0]
        torch.testing.assert_close(out[k], ref, atol=2e-3, rtol=1e-5, msg=f"crop {k}")
    with pytest.raises(ValueError, match=r"crop box \[15, 15, 20, 20\] .* sample 1 is not inside its 32x32 image"):
        resized_crops(x[:2], torch.tensor([[0, 0, 8, 8], [15, 15, 20, 20]]), [(8, 8)])
    with pytest.raises(ValueError, match="not inside"):
        resized_crops([x[0]], torch.tensor([[-1, 0, 8, 8]]), [(8, 8)])
    with pytest.raises(ValueError, match="empty batch"):
        resized_crops([], torch.zeros(0, 4, dtype=torch.long), [(8, 8)])
    with pytest.raises(ValueError, match="2 images but 1 boxes"):
        resized_crops(x[:2], boxes[:1], [(8, 8)])


def test_both_views_come_from_the_same_crop_and_flip():
    imgs = torch.stack([torch.from_numpy(_smooth_image(96, 128, s)).permute(2, 0, 1) for s in range(8)])
    views = PretrainViews((64, 64), (32, 32), color_jitter=(0.4, 0.4, 0.4), seed=0)
    out = views(list(imgs), torch.arange(8), 0)
    mean, std = views.mean, views.std
    patch = out["image"] * std + mean
    down = torch.nn.functional.interpolate(patch, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    same = (down - out["tok_image"]).abs().mean(dim=(1, 2, 3))
    other = (down - out["tok_image"].roll(1, 0)).abs().mean(dim=(1, 2, 3))
    assert same.max() < 0.03, same
    assert other.min() > 3 * same.max(), (same, other)
    assert out["image"].shape == (8, 3, 64, 64) and out["tok_image"].shape == (8, 3, 32, 32)


def test_flip_rate_and_flip_is_applied():
    n = 4000
    views = PretrainViews((32, 32), (16, 16), color_jitter=(0, 0, 0), seed=5)
    flips = views.params(torch.arange(n), 3, torch.full((n,), 32), torch.full((n,), 32))["flip"].float().mean()
    assert abs(float(flips) - 0.5) < 0.03
    # whole image, no resize: the patch view is the image or its mirror, as the flip parameter says
    whole = PretrainViews((32, 32), (32, 32), scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=(0, 0, 0),
                          mean=(0, 0, 0), std=(1, 1, 1))
    img = torch.from_numpy(_smooth_image(32, 32, 1)).permute(2, 0, 1)
    idx = torch.arange(16)
    out = whole(img.expand(16, -1, -1, -1).contiguous(), idx, 0)["image"]
    flip = whole.params(idx, 0, torch.full((16,), 32), torch.full((16,), 32))["flip"]
    x = img.float() / 255
    for i in range(16):
        want = x.flip(-1) if flip[i] else x
        assert (out[i] - want).abs().max() < 1e-4
    assert 0 < int(flip.sum()) < 16


def test_color_jitter_statistics_match_torchvision():
    # brightness alone: the mean ratio of output to input follows U[0.6, 1.4] as T.ColorJitter's factor
    img = torch.full((1, 3, 16, 16), 100, dtype=torch.uint8)
    views = PretrainViews((16, 16), (16, 16), scale=(1, 1), ratio=(1, 1), color_jitter=(0.4, 0, 0),
                          mean=(0, 0, 0), std=(1, 1, 1))
    n = 2000
    f = views.params(torch.arange(n), 0, torch.full((n,), 16), torch.full((n,), 16))["jitter"][:, 0].numpy()
    torch.manual_seed(0)
    ref = np.array([float(T.ColorJitter.get_params([0.6, 1.4], None, None, None)[1]) for _ in range(n)])
    assert _ks(f, ref) < 0.06
    out = views(img.expand(4, -1, -1, -1), torch.arange(4), 0)["image"]
    fac = views.params(torch.arange(4), 0, torch.full((4,), 16), torch.full((4,), 16))["jitter"][:, 0]
    assert torch.allclose(out.mean(dim=(1, 2, 3)), (100 / 255 * fac).float().clamp(max=1), atol=1e-4)


# ------------------------------------------------------------------------------------------ decoding
@pytest.fixture(scope="module")
def odd_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("odd")
    a = _smooth_image(30, 40)
    Image.fromarray(a).save(root / "a_good.jpg", quality=95)
    Image.fromarray(a).save(root / "b_lossless.png")
    Image.fromarray(a).convert("CMYK").save(root / "c_cmyk.jpg")
    Image.fromarray(a).save(root / "d_progressive.jpg", progressive=True, quality=95)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(root / "e_exif6.jpg", exif=exif, quality=95)
    (root / "f_garbage.jpg").write_bytes(b"not an image at all")
    data = (root / "a_good.jpg").read_bytes()
    (root / "g_truncated.jpg").write_bytes(data[: len(data) * 9 // 10])  # header intact, scan cut short
    Image.fromarray(a[:, :, 0]).save(root / "h_gray.jpg")
    return root


def _pil(path: Path) -> torch.Tensor:
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("jpeg_decode", ["device", "workers"])
def test_decoder_falls_back_per_file_and_skips_broken_files_by_name(odd_files, jpeg_decode):
    ds = EncodedImageFiles.from_folder(odd_files, mask_generator=BlockwiseMaskGenerator((2, 2), 2, 1),
                                       jpeg_decode=jpeg_decode)
    samples = [ds[i] for i in range(len(ds))]
    reasons = {Path(s.name).name: s.reason for s in samples}
    assert reasons["a_good.jpg"] is None and reasons["e_exif6.jpg"] is None
    assert reasons["b_lossless.png"] == "png" and reasons["c_cmyk.jpg"] == "mode CMYK"
    assert reasons["d_progressive.jpg"] == "progressive" and reasons["h_gray.jpg"] == "mode L"
    # the garbage file (and, decoding in the workers, the truncated one) is replaced in the worker by the next
    # readable one, and named in the batch
    in_worker = ["f_garbage.jpg"] + (["g_truncated.jpg"] if jpeg_decode == "workers" else [])
    assert [Path(n).name for s in samples for n in s.skipped] == in_worker
    batch = collate_encoded(samples)
    assert (batch.blob.numel() > 0) == (jpeg_decode == "device")  # bytes travel only for the GPU decoder
    dec = BatchDecoder("cpu")
    images, batch2 = dec(batch)
    assert len(images) == len(ds) == len(batch2.index) and batch2.masks.shape == (len(ds), 2, 2)
    # the truncated JPEG passes the header check, then fails to decode: skipped and named either way
    assert dec.skipped_names == [str(odd_files / "f_garbage.jpg"), str(odd_files / "g_truncated.jpg")]
    # in the workers, f_garbage and g_truncated were replaced by the next readable file, h_gray: counted thrice
    gray = 1 if jpeg_decode == "device" else 3
    assert dec.summary()["fallback"] == {"png": 1, "mode CMYK": 1, "progressive": 1, "mode L": gray}
    # a_good, e_exif6: decode_jpeg on this device (a CPU one: counted as main_cpu, not gpu), or by the loader (read
    # here, not in DataLoader workers: in_process)
    assert (dec.num_gpu, dec.num_main_cpu, dec.num_workers, dec.num_in_process) == (
        (0, 2, 0, 0) if jpeg_decode == "device" else (0, 0, 0, 2))
    said: list[str] = []  # the tasks' one log line of it: said for this decoder, not for an idle one
    assert decode_summary(dec, said.append) == dec.summary() and said == [f"data: {dec.summary()}"]
    assert decode_summary(BatchDecoder("cpu"), said.append)["skipped"] == 0 and len(said) == 1
    g = batch.names.index(str(odd_files / "g_truncated.jpg")) if jpeg_decode == "device" else None
    if g is not None:  # replaced in the batch by another image of it
        assert batch2.names[g] != batch.names[g]
        assert torch.equal(images[g], images[batch.names.index(batch2.names[g])])
    for i, name in enumerate(batch2.names):
        want = _pil(Path(name))
        assert images[i].shape == want.shape, name
        tol = 0 if name.endswith(".png") else 3  # libjpeg builds may differ by a level or two
        assert (images[i].int() - want.int()).abs().float().mean() <= tol, name
    assert images[batch.names.index(str(odd_files / "e_exif6.jpg"))].shape == (3, 40, 30)  # EXIF applied


def test_a_batch_none_of_whose_files_decode_gets_a_spare_image_and_is_counted(odd_files):
    """GPU decoder path, batch size 1: a truncated JPEG alone in its batch must not stop the epoch."""
    ds = EncodedImageFiles.from_folder(odd_files, jpeg_decode="device")
    trunc = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("g_truncated.jpg")][0]
    good = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("a_good.jpg")][0]
    # the very first batch: the dataset's first readable file stands in
    dec = BatchDecoder("cpu", skips=ds.skip_counter, spare_source=ds.spare_image)
    first, _ = dec(collate_encoded([ds[(0, trunc)]]))
    assert torch.equal(first[0], _pil(Path(ds.samples[0][0])))  # a_good.jpg, the first file
    # later: an image kept from a decoded batch
    dec = BatchDecoder("cpu", skips=ds.skip_counter)
    kept, _ = dec(collate_encoded([ds[(1, good)]]))
    again, _ = dec(collate_encoded([ds[(1, trunc)]]))
    assert torch.equal(again[0], kept[0]) and dec.num_skipped == 1
    assert ds.skipped_count(0) == 1 and ds.skipped_count(1) == 1 and ds.skipped_count() == 2
    # without a source (a stream), a grey stand-in; a folder with no readable file is one named error
    grey, _ = BatchDecoder("cpu")(collate_encoded([ds[(2, trunc)]]))
    assert grey[0].shape == (3, 64, 64) and bool((grey[0] == 128).all())
    bad = EncodedImageFiles([(str(odd_files / "f_garbage.jpg"), -1)])
    with pytest.raises(NoReadableImagesError, match="none of the 1 images could be read"):
        bad.spare_image()


def test_workers_count_their_skips_per_epoch(odd_files):
    ds = EncodedImageFiles.from_folder(odd_files)  # workers decode: garbage and truncated files skipped here
    for epoch in (0, 1):
        for i in range(len(ds)):
            ds[(epoch, i)]
    assert ds.skipped_count(0) == ds.skipped_count(1) == 2 and ds.skipped_count() == 4


def test_a_bad_file_found_in_one_worker_is_known_to_all(odd_files):
    """The unreadable files one DataLoader worker finds are shared (as the CPU datasets share them): the other
    workers and the main process never read them again (two workers may still meet the same new bad file at
    once, within its first epoch)."""
    ds = EncodedImageFiles.from_folder(odd_files)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=lambda b: b)
    named = {p for batch in loader for s in batch for p in s.skipped}
    assert {Path(p).name for p in named} == {"f_garbage.jpg", "g_truncated.jpg"}
    assert int(ds._bad_mask.sum()) == 2 and ds._bad == {}  # found in the workers, known here
    second = [p for batch in loader for s in batch for p in s.skipped]
    assert second == []  # later epochs (fresh workers) replace them without reading them again


def test_small_images_of_different_sizes_crop_each_within_its_own_padding():
    """<= 32 px recipe on a folder (a list of images of different sizes, e.g. EXIF-rotated): each sample's
    crop is what augmenting it alone gives."""
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in [(40, 48), (48, 40), (32, 32)]]
    aug = FinetuneAugment(32, auto_augment=None, re_prob=0.0, seed=2)
    idx = torch.arange(3)
    out = aug(imgs, idx, 0)
    for k in range(3):
        torch.testing.assert_close(out[k:k + 1], aug([imgs[k]], idx[k:k + 1], 0))


@pytest.mark.parametrize("jpeg_decode", ["workers", "device"])
@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_crops_cut_in_the_workers_give_the_views_of_the_whole_images(odd_files, task, jpeg_decode):
    """Workers that cut each image to its crop box before it travels (``worker_crop``) give the views the whole
    images give (EXIF-rotated, PNG, CMYK, grayscale and replaced files included; two epochs), with fewer pixels
    in the batch; from DataLoader workers the batch's buffer is in shared memory already. With the GPU decoding
    JPEGs, only the files decoded in the workers come cropped: a batch mixes both."""
    if task == "pretrain":
        aug: Any = PretrainViews((16, 16), (8, 8), seed=3)
    else:
        aug = FinetuneAugment(48, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, seed=3)

    def views(crop: bool, epoch: int, workers: int = 0) -> tuple[Any, Any]:
        ds = EncodedImageFiles.from_folder(odd_files, seed=3, crop=aug.worker_crop() if crop else None,
                                           jpeg_decode=jpeg_decode)
        ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=len(ds), num_workers=workers, collate_fn=collate_encoded)
        batch = next(iter(loader))
        imgs, batch = BatchDecoder("cpu")(batch)
        out = aug(imgs, batch.index, batch.epoch, cropped=batch.cropped)
        return (out if isinstance(out, dict) else {"image": out}), batch

    for epoch in (0, 1):
        whole, wb = views(False, epoch)
        cut, cb = views(True, epoch)
        # (a file the GPU decoder fails on takes another sample's image, and that sample's cropped flag)
        assert wb.cropped is None and cb.pixels.numel() < wb.pixels.numel()
        assert bool(cb.cropped.all()) == (jpeg_decode == "workers") and bool(cb.cropped.any())
        for k in whole:
            torch.testing.assert_close(cut[k], whole[k], atol=1e-4, rtol=1e-4, msg=f"{k}, epoch {epoch}")
    cut, cb = views(True, 0, workers=2)
    assert cb.pixels.is_shared()
    torch.testing.assert_close(cut["image"], views(False, 0)[0]["image"], atol=1e-4, rtol=1e-4)


def test_small_recipe_cuts_windows_without_padding_the_batch_to_its_largest_sides():
    """A tall and a wide strip in one batch (scaled up to 32 px on their short side: 32 x 10,667 and 10,667 x 32)
    are cut window by window: padding every image to the batch's largest height and width first took ~0.7 GB here
    (and a CUDA out-of-memory at batch 256); each sample's crop is what augmenting it alone gives."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in [(3, 1000), (1000, 3), (40, 36)]]
    aug = FinetuneAugment(32, auto_augment=None, re_prob=0.0, seed=2)
    idx = torch.arange(3)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = aug(imgs, idx, 0)
    biggest = max(e.cpu_memory_usage for e in prof.key_averages())
    assert biggest < 50 * 2**20, f"{biggest / 2**20:.0f} MiB in one op"
    for k in range(3):
        torch.testing.assert_close(out[k:k + 1], aug([imgs[k]], idx[k:k + 1], 0))


def test_pretrain_pipeline_from_files_gives_the_batch_the_step_expects(odd_files):
    masks = BlockwiseMaskGenerator((4, 4), 6, 2)
    ds = EncodedImageFiles.from_folder(odd_files, mask_generator=masks, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_encoded)
    pipe = PretrainPipeline(PretrainViews((16, 16), (8, 8), seed=3), "cpu")
    batch = next(iter(loader))
    out = pipe(batch)
    assert out["image"].shape == (4, 3, 16, 16) and out["tok_image"].shape == (4, 3, 8, 8)
    assert out["mask"].shape == (4, 4, 4) and out["mask"].dtype == torch.bool
    again = pipe(next(iter(loader)))  # same (seed, epoch, index): same views and masks
    assert torch.equal(out["image"], again["image"]) and torch.equal(out["mask"], again["mask"])


# ------------------------------------------------------------------------------------------ fine-tuning recipe
def test_randaugment_ops_match_timm_on_pil():
    from timm.data import auto_augment as aa

    img = Image.fromarray(_smooth_image(48, 48, 2))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255
    fill = (124, 116, 104)
    fill_t = torch.tensor(fill, dtype=torch.float32).view(1, 3, 1, 1) / 255
    cases = {"AutoContrast": None, "Equalize": None, "Invert": None, "Rotate": 20.0, "PosterizeIncreasing": 2,
             "SolarizeIncreasing": 100, "SolarizeAdd": 60, "ColorIncreasing": 1.6, "ContrastIncreasing": 0.4,
             "BrightnessIncreasing": 1.5, "SharpnessIncreasing": 1.8, "ShearX": 0.2, "ShearY": -0.2,
             "TranslateXRel": 0.3, "TranslateYRel": -0.3}
    for name, arg in cases.items():
        fn = aa.NAME_TO_OP[name]
        args = () if arg is None else (arg,)
        want = fn(img, *args, fillcolor=fill, resample=Image.BILINEAR)
        want_t = torch.from_numpy(np.asarray(want).copy()).permute(2, 0, 1).float() / 255
        got = _apply_op(name, x.clone(), torch.tensor([0.0 if arg is None else float(arg)], dtype=torch.float64),
                        fill_t)[0]
        err = (got - want_t).abs().mean().item()
        assert err < (0.02 if name in ("Rotate", "ShearX", "ShearY") else 0.006), (name, err)


def test_randaugment_choices_follow_timm_recipe():
    aug = FinetuneAugment(32, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.0)
    n = 4000
    u = per_sample_uniforms(0, 0, torch.arange(n), 10)
    layers = aug.ra_params(u)
    assert len(layers) == 2 and len(aug.ra.names) == 15
    op, applied, arg = layers[0]
    assert abs(float(applied.float().mean()) - 0.5) < 0.03  # each layer applies with p=0.5
    counts = torch.bincount(op, minlength=15).float() / n
    assert (counts - 1 / 15).abs().max() < 0.02  # uniform choice with replacement
    rot = arg[op == aug.ra.names.index("Rotate")].numpy()
    # timm: |deg| = N(9, 0.5) clipped to [0, 10] / 10 * 30, random sign
    assert abs(np.abs(rot).mean() - 27.0) < 0.5 and abs((rot > 0).mean() - 0.5) < 0.1
    with pytest.raises(ValueError, match="auto_augment 'augmix-m5': the tensor path implements RandAugment"):
        FinetuneAugment(32, auto_augment="augmix-m5")


def test_finetune_augment_is_per_sample_and_independent_of_the_batch():
    imgs = torch.stack([torch.from_numpy(_smooth_image(40, 56, s)).permute(2, 0, 1) for s in range(6)])
    aug = FinetuneAugment(32, re_prob=0.0, seed=2)
    big = FinetuneAugment(48, re_prob=0.0, seed=2)
    a = big(list(imgs), torch.arange(10, 16), 1)
    b = big(list(imgs[2:3]), torch.tensor([12]), 1)
    assert a.shape == (6, 3, 48, 48) and torch.allclose(a[2], b[0], atol=1e-5)
    small = aug(imgs[:, :, :32, :32].contiguous(), torch.arange(6), 0)
    assert small.shape == (6, 3, 32, 32)
    erase = FinetuneAugment(32, auto_augment=None, re_prob=1.0, hflip=0.0, seed=2)
    p = erase.params(torch.arange(200), 0, torch.full((200,), 32), torch.full((200,), 32))
    assert p["erase"].float().mean() > 0.9  # erasing at p=1 (a few draws find no box, as timm)
    area = (p["erase_box"][:, 2] * p["erase_box"][:, 3]).float() / 1024
    assert 0.015 < area.min() and area.max() < 0.36
    # applied: noise exactly inside each sample's box, the image untouched outside
    plain = FinetuneAugment(32, auto_augment=None, re_prob=0.0, hflip=0.0, seed=2)
    x = imgs[:, :, :32, :32].contiguous()
    out, ref = erase(x, torch.arange(6), 0), plain(x, torch.arange(6), 0)
    p = erase.params(torch.arange(6), 0, torch.full((6,), 32), torch.full((6,), 32))
    for k, ((t, left, h, w), on) in enumerate(zip(p["erase_box"].tolist(), p["erase"].tolist())):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[t:t + h, left:left + w] = on
        assert torch.equal(out[k][:, ~inside], ref[k][:, ~inside])
        assert (out[k][:, inside] != ref[k][:, inside]).float().mean() > 0.99


def test_batched_randaugment_equals_each_sample_alone():
    """FinetuneAugment's batched dispatch (ops on disjoint sample sets, the geometric ones in one resampling)
    gives what applying each sample's own ops to it alone gives."""
    imgs = torch.stack([torch.from_numpy(_smooth_image(48, 48, s)).permute(2, 0, 1) for s in range(24)])
    idx = torch.arange(24)
    ra = FinetuneAugment(48, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.0, seed=5)
    plain = FinetuneAugment(48, auto_augment=None, re_prob=0.0, seed=5)  # same crop and flip draws
    out = ra(imgs, idx, 3)
    base = plain(imgs, idx, 3) * plain.std + plain.mean  # back to [0, 1]
    layers = ra.params(idx, 3, torch.full((24,), 48), torch.full((24,), 48))["ra"]
    names = {name for op, on, _ in layers for name in [ra.ra.names[int(i)] for i in op[on]]}
    assert len(names) >= 8 and len(names & {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}) >= 2
    for k in range(24):
        x = base[k:k + 1].clone()
        for op, on, arg in layers:
            if on[k]:
                x = _apply_op(ra.ra.names[int(op[k])], x, arg[k:k + 1], ra.fill)
        torch.testing.assert_close(out[k:k + 1], (x - ra.mean) / ra.std, atol=1e-4, rtol=1e-4, msg=f"sample {k}")


def test_in_memory_path_shapes_and_mixup_label_mixing():
    from timm.data import Mixup

    n = 12
    images = torch.from_numpy(np.stack([_smooth_image(32, 32, s) for s in range(n)]))  # [N, H, W, 3]
    labels = torch.arange(n) % 4
    ds = InMemoryIndices(n, seed=0)
    batch = InMemoryIndices.collate([ds[i] for i in (3, 1, 4, 0, 5, 9)])
    pipe = FinetunePipeline(FinetuneAugment(32, seed=0), "cpu", images, labels)
    x, y = pipe(batch)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and y.tolist() == [3, 1, 0, 0, 1, 1]
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=4)
    np.random.seed(0)
    xm, soft = mix(x.clone(), y)
    assert torch.allclose(soft.sum(1), torch.ones(6))
    off, on = 0.1 / 4, 1 - 0.1 + 0.1 / 4
    lam = float((soft[0, 3] - off) / (on - off))  # sample 0 (class 3) is mixed with sample 5 (class 1)
    assert 0 < lam < 1
    hard = torch.nn.functional.one_hot(y, 4).float() * (on - off) + off
    assert torch.allclose(soft, lam * hard + (1 - lam) * hard.flip(0), atol=1e-5)
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-4)  # batch mode: images mixed alike
    # pre-training views from the same in-memory store, masks drawn per (seed, epoch, index) in the workers
    masks = BlockwiseMaskGenerator((8, 8), 26, 4)
    pds = InMemoryIndices(n, mask_generator=masks, seed=7)
    pp = PretrainPipeline(PretrainViews((32, 32), (32, 32), seed=7), "cpu", images)
    out = pp(InMemoryIndices.collate([pds[i] for i in range(4)]))
    assert out["image"].shape == (4, 3, 32, 32) and out["mask"].shape == (4, 8, 8)
    assert torch.equal(out["mask"][2], pds[2][2]) and not torch.equal(pds[(1, 2)][2], pds[(0, 2)][2])


# ------------------------------------------------------------------------------------------ config
def test_device_path_masks_equal_those_drawn_under_seeded():
    """The device path draws each mask from a generator seeded by (seed, epoch, index), without the global
    RNG save/restore of ``seeded``: the masks are the same as the CPU path's."""
    from beit.data.seeding import seeded

    masks = BlockwiseMaskGenerator((8, 8), 24, 4)
    ds = InMemoryIndices(50, mask_generator=masks, seed=7)
    for epoch, index in [(0, 0), (0, 13), (3, 49)]:
        with seeded(7, epoch, index):
            want = masks()
        assert torch.equal(ds[(epoch, index)][2], want)


def test_data_device_setting(beit_warnings):
    assert use_device_path("auto", "cpu") is False and use_device_path("auto", "cuda") is True
    assert use_device_path("cpu", "cuda") is False and not beit_warnings
    assert use_device_path("gpu", "cpu") is True  # asked for the GPU without one: said
    assert [r.getMessage() for r in beit_warnings] == [  # and names the value that asks for it without a warning
        "data.device=gpu without CUDA: the batched tensor path runs on cpu (data.device=batched asks for that "
        "without this warning)"]
    # batched: the same path on whatever the training device is, CPU included, without the warning (beit demo)
    assert use_device_path("batched", "cpu") is True and use_device_path("batched", "cuda") is True
    assert len(beit_warnings) == 1
    with pytest.raises(ValueError, match=r"^must be auto \| cpu \| gpu \| batched, got 'tpu'$"):
        use_device_path("tpu", "cpu")


def test_finetune_device_path_refuses_recipes_it_lacks(tmp_path):
    from beit.engine import ConfigError, load_config
    from beit.tasks.classify import FinetuneConfig, build_device_train

    base = ["model=beit_tiny_patch16_224", "data.resize=full", "data.auto_augment=null", f"data.train_dir={tmp_path}"]
    for device in ("gpu", "batched"):  # asked for by name: refused when the config is read, not quietly the CPU path
        with pytest.raises(ConfigError, match=rf"^config key 'data\.device': {device} cannot run this recipe: "
                                              r"data\.resize='full' \(only 'crop'\); use auto or cpu$"):
            load_config(FinetuneConfig, None, [*base, f"data.device={device}"])
    cfg = load_config(FinetuneConfig, None, [*base, "data.device=auto"])
    assert build_device_train(cfg, "cuda") is None  # auto: quietly the CPU path
    cfg.data.device = "batched"  # a config changed after it was read: still refused when the data is built
    with pytest.raises(ConfigError, match=r"data\.device.*batched cannot run this recipe: data\.resize='full'"):
        build_device_train(cfg, "cpu")
    for bad in ("fast", "Batched", "batched "):
        with pytest.raises(ConfigError, match=rf"^config key 'data\.device': must be auto \| cpu \| gpu \| batched, "
                                              rf"got '{bad}'$"):
            load_config(FinetuneConfig, None, ["model=beit_tiny_patch16_224", f"data.device='{bad}'"])
    cfg.data.device = "fast"
    with pytest.raises(ConfigError, match=r"data\.device.*must be auto \| cpu \| gpu \| batched, got 'fast'"):
        build_device_train(cfg, "cpu")


def test_pretrain_device_setting_errors_name_the_key(tmp_path):
    from beit.engine import ConfigError
    from beit.tasks.pretrain import PretrainConfig, PretrainDataConfig, build_device_data

    (tmp_path / "a.tar").write_bytes(b"")

    def cfg(path, device):
        return PretrainConfig(data=PretrainDataConfig(path=str(path), num_samples=8, device=device))

    with pytest.raises(ConfigError, match=r"data\.device.*must be auto \| cpu \| gpu \| batched, got 'fast'"):
        build_device_data(cfg(tmp_path, "fast"), 8, "cpu")
    assert build_device_data(cfg(tmp_path, "auto"), 8, "cpu") is None  # auto without CUDA: the PIL path
    from beit.engine import load_config
    from beit.tasks.classify import FinetuneConfig

    with pytest.raises(ConfigError, match=r"data\.jpeg_decode.*must be workers \| device, got 'gpu'"):
        load_config(PretrainConfig, None, [f"data.path={tmp_path}", "data.jpeg_decode=gpu"])
    with pytest.raises(ConfigError, match=r"data\.jpeg_decode.*must be workers \| device, got 'nvjpeg'"):
        load_config(FinetuneConfig, None, ["model=beit_tiny_patch16_224", "data.jpeg_decode=nvjpeg"])
    with pytest.raises(ValueError, match=r"jpeg_decode must be one of workers \| device, got 'gpu'"):
        EncodedImageFiles([("x.jpg", -1)], jpeg_decode="gpu")


def test_jpeg_decode_device_without_the_device_path_is_named(tmp_path, caplog):
    from beit.tasks.pretrain import PretrainConfig, PretrainDataConfig, build_device_data

    (tmp_path / "a.tar").write_bytes(b"")
    cfg = PretrainConfig(data=PretrainDataConfig(path=str(tmp_path), num_samples=8, device="cpu",
                                                 jpeg_decode="device"))
    with caplog.at_level("WARNING"):
        assert build_device_data(cfg, 8, "cuda") is None
    assert "data.jpeg_decode=device has no effect here: data.device=cpu reads the images on the CPU path" in caplog.text


def test_device_path_trains_finetune_and_pretrain_end_to_end(tmp_path):
    from _finetune_data import TINY_OVERRIDES, colored_squares
    from beit.engine import load_config
    from beit.tasks.classify import FinetuneConfig, finetune

    data = colored_squares(tmp_path / "sq", {"train": 16, "val": 4})
    cfg = load_config(FinetuneConfig, None, [
        *TINY_OVERRIDES, f"train.output_dir={tmp_path / 'ft'}", "train.num_workers=0", "train.batch_size=8",
        "train.max_steps=2", "train.warmup_epochs=0", "train.epochs=1", f"data.train_dir={data / 'train'}",
        f"data.val_dir={data / 'val'}", "data.device=gpu"])
    res = finetune(cfg)
    assert res["step"] == 2 and 0 <= res["top1"] <= 100
    assert res["data_decode"]["fallback"] == {"png": 16} and res["data_decode"]["skipped"] == 0  # 2 steps x 8 PNGs
    assert "data: {'gpu': 0, " in (tmp_path / "ft" / "log.txt").read_text()  # what the decoder did, in a line
    # pre-training from a folder with a broken file, views made by the batched path
    from beit.tasks.pretrain import PretrainConfig, pretrain
    from beit.tokenizers import DiscreteVAE

    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        Image.fromarray(_smooth_image(40, 48, i)).save(images / f"{i}.jpg")
    (images / "broken.jpg").write_bytes(b"not an image")
    torch.manual_seed(0)
    DiscreteVAE(vocab_size=16, hidden=8, downsample=4, num_res_blocks=0, codebook_dim=8).save(tmp_path / "tok.st")
    pcfg = load_config(PretrainConfig, None, [
        f"data.path={images}", "data.num_mask_patches=26", "data.min_mask_patches_per_block=4", "data.device=gpu",
        "model.name=beit_tiny_patch16_224", "model.img_size=32", "model.patch_size=4", "model.embed_dim=32",
        "model.depth=2", "model.num_heads=2", "tokenizer.kind=dvae", f"tokenizer.path={tmp_path / 'tok.st'}",
        f"train.output_dir={tmp_path / 'pt'}", "train.batch_size=4", "train.num_workers=0", "train.max_steps=3",
        "train.warmup_steps=1", "train.log_every=1", "vis_samples=2"])
    out = pretrain(pcfg)
    assert out["step"] == 3 and Path(out["panel"]).exists()
    assert out["data_decode"]["skipped_names"] == [str(images / "broken.jpg")]
    from beit.engine.logging import read_metrics

    rows = read_metrics(tmp_path / "pt" / "metrics.jsonl", split="data")  # per-epoch skip records, as the CPU path
    assert rows and rows[-1]["skipped_files_total"] == sum(r["skipped_files"] for r in rows) >= 1
    # JPEGs: decoded by the loader by default (data.jpeg_decode=workers), here in this process (num_workers=0),
    # nothing by the GPU decoder
    assert out["data_decode"]["in_process"] >= 12 and out["data_decode"]["workers"] == out["data_decode"]["gpu"] == 0
    assert not out["data_decode"]["fallback"]


def test_in_memory_device_path_logs_no_line_of_zeros(tmp_path):
    """With data.in_memory (beit demo) the batched decoder does nothing after the start: its summary, all zeros
    ({'gpu': 0, 'workers': 0, 'fallback': {}, ...}), stays in the result and out of the log and console."""
    from _finetune_data import TINY_OVERRIDES, colored_squares
    from beit.engine import load_config
    from beit.tasks.classify import FinetuneConfig, finetune

    data = colored_squares(tmp_path / "sq", {"train": 8})
    res = finetune(load_config(FinetuneConfig, None, [
        *TINY_OVERRIDES, f"train.output_dir={tmp_path / 'ft'}", "train.num_workers=0", "train.batch_size=8",
        "train.max_steps=1", "train.warmup_epochs=0", f"data.train_dir={data / 'train'}", "data.in_memory=true",
        "data.device=batched"]))
    assert res["data_decode"] == {"gpu": 0, "workers": 0, "fallback": {}, "skipped": 0, "skipped_names": []}
    assert "data: {" not in (tmp_path / "ft" / "log.txt").read_text()


def test_device_path_resume_is_exact(tmp_path):
    """Augmentation parameters are a function of (seed, epoch, index): a resumed run sees the same data."""
    from _finetune_data import TINY_OVERRIDES, colored_squares
    from beit.engine import load_config
    from beit.engine.logging import read_metrics
    from beit.tasks.classify import FinetuneConfig, finetune

    data = colored_squares(tmp_path / "sq", {"train": 8})

    def cfg(out, *extra):
        return load_config(FinetuneConfig, None, [
            *TINY_OVERRIDES, f"train.output_dir={out}", "train.num_workers=0", "train.batch_size=8",
            "train.max_steps=4", "train.warmup_steps=1", "train.ckpt_every=1", "train.log_every=1",
            f"data.train_dir={data / 'train'}",
            "data.device=gpu", *extra])

    finetune(cfg(tmp_path / "full"))
    finetune(cfg(tmp_path / "part"), stop_after_step=2)
    finetune(cfg(tmp_path / "part", "train.resume=auto"))

    def losses(d):
        return [(r["step"], r["loss"]) for r in read_metrics(d / "metrics.jsonl") if "loss" in r]

    assert len(losses(tmp_path / "full")) == 4
    assert losses(tmp_path / "full") == losses(tmp_path / "part")


def test_webdataset_shards_on_the_device_path(tmp_path):
    import io

    wds = pytest.importorskip("webdataset")  # a [test] extra; the lent GPU image lacks it

    from beit.data.gpu_decode import EncodedWebDataset

    shard = tmp_path / "train-0000.tar"
    with wds.TarWriter(str(shard)) as w:
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray(_smooth_image(24, 32, i)).save(buf, format="JPEG" if i % 2 else "PNG")
            w.write({"__key__": f"k{i}", "jpg" if i % 2 else "png": buf.getvalue(), "cls": str(i % 3).encode()})
            if i == 2:
                w.write({"__key__": "bad", "jpg": b"not an image", "cls": b"0"})
    masks = BlockwiseMaskGenerator((2, 2), 2, 1)
    outs = {}
    for where in ("workers", "device"):
        ds = EncodedWebDataset([str(shard)], mask_generator=masks, label_key="cls", shuffle_shards=False, seed=4,
                               jpeg_decode=where)
        batch = collate_encoded(list(ds))
        assert len(batch) == 6 and batch.labels.tolist() == [0, 1, 2, 0, 1, 2]
        assert batch.skipped == [f"{shard}:bad"] and batch.reasons == ["png", None] * 3
        pipe = PretrainPipeline(PretrainViews((16, 16), (8, 8), seed=4), "cpu")
        out = pipe(batch)
        summary = pipe.decoder.summary()
        assert out["image"].shape == (6, 3, 16, 16) and summary["skipped_names"] == [f"{shard}:bad"]
        # decode_jpeg on this (CPU) device: main_cpu, not gpu; the loader's decodes ran here (no workers): in_process
        assert (summary["gpu"], summary.get("main_cpu", 0), summary["workers"], summary.get("in_process", 0)) == (
            (0, 3, 0, 0) if where == "device" else (0, 0, 0, 3))
        again = collate_encoded(list(ds))  # per-sample randomness from (seed, epoch, __key__): the same again
        assert torch.equal(again.masks, batch.masks) and torch.equal(pipe(again)["image"], out["image"])
        outs[where] = out["image"]
    # the same libjpeg-turbo decodes the JPEGs either way on CPU: identical views
    assert torch.equal(outs["workers"], outs["device"])


def test_small_recipe_without_padding_and_images_smaller_than_the_crop():
    """crop_padding=0 still crops (a window of the image itself, no shift beyond it), and images with a side
    under the crop are scaled up first (aspect kept), as the CPU path's EnsureMinSize: no box outside them."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (4, 3, 40, 48), generator=g, dtype=torch.uint8)
    plain = FinetuneAugment(32, crop_padding=0, auto_augment=None, re_prob=0.0, hflip=0.0, mean=(0, 0, 0),
                            std=(1, 1, 1), seed=1)
    out = plain(imgs, torch.arange(4), 0)
    p = plain.params(torch.arange(4), 0, torch.full((4,), 40), torch.full((4,), 48))
    assert out.shape == (4, 3, 32, 32)
    for k, (t, left, _, _) in enumerate(p["box"].tolist()):
        assert 0 <= t <= 8 and 0 <= left <= 16
        torch.testing.assert_close(out[k], imgs[k, :, t:t + 32, left:left + 32].float() / 255)
    full = FinetuneAugment(32, crop_padding=0, seed=1)  # RandAugment and erasing on the same path
    assert full(imgs, torch.arange(4), 0).shape == (4, 3, 32, 32)
    tiny = [torch.randint(0, 256, (3, 20, 24), generator=g, dtype=torch.uint8),
            torch.randint(0, 256, (3, 9, 40), generator=g, dtype=torch.uint8)]
    for aug in (plain, full, FinetuneAugment(32, seed=1)):
        y = aug(tiny, torch.arange(2), 0)
        assert y.shape == (2, 3, 32, 32) and torch.isfinite(y).all()
    y = plain(tiny, torch.arange(2), 0)
    assert (y[0] > 0).float().mean() > 0.9  # a crop of the scaled-up image, not of zero padding
    from beit.data.gpu_augment import _at_least

    assert [tuple(im.shape) for im in _at_least(tiny, 32)] == [(3, 32, 39), (3, 32, 143)]  # as EnsureMinSize
    assert _at_least(imgs, 32) is imgs


def test_a_request_passing_over_two_bad_files_counts_both_once_an_epoch(odd_files):
    """The epoch's count is of files, as the warnings name them: f_garbage's request passes over g_truncated too."""
    ds = EncodedImageFiles.from_folder(odd_files)  # workers decode: both fail here
    f = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("f_garbage.jpg")][0]
    ds[(0, f)]
    assert ds.skipped_count(0) == 2
    ds[(0, f + 1)]  # g_truncated itself: already counted in epoch 0
    assert ds.skipped_count(0) == 2
    ds[(1, f + 1)]
    assert ds.skipped_count(1) == 1 and ds.skipped_count() == 3


def test_device_decode_counts_a_truncated_jpeg_once_an_epoch(odd_files):
    """jpeg_decode=device: g_truncated passes the workers' header check and fails in the batch decoder twice an
    epoch, as itself and as f_garbage's replacement (the next file): one skipped file of the epoch, not two."""
    ds = EncodedImageFiles.from_folder(odd_files, jpeg_decode="device")
    f = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("f_garbage.jpg")][0]
    dec = BatchDecoder("cpu", skips=ds.skip_counter)
    for epoch in (0, 1):
        first = collate_encoded([ds[(epoch, i)] for i in range(f + 1)])  # f_garbage's request: g_truncated's bytes
        assert first.names[f] == str(odd_files / "g_truncated.jpg")
        dec(first)
        dec(collate_encoded([ds[(epoch, i)] for i in range(f + 1, len(ds))]))  # g_truncated's own request
    assert ds.skipped_count(0) == ds.skipped_count(1) == 2 and ds.skipped_count() == 4  # f_garbage, g_truncated
    assert dec.skipped_names == [str(odd_files / "f_garbage.jpg"), str(odd_files / "g_truncated.jpg")]


def test_decoder_summary_says_whether_loader_workers_decoded_the_jpegs(odd_files):
    """jpeg_decode=workers: with num_workers=0 the loader decodes the JPEGs (a_good, e_exif6) in this process, and the
    summary says so (``workers`` 0, ``in_process`` 2), not that workers decoded them."""
    ds = EncodedImageFiles.from_folder(odd_files)
    for num_workers, want in ((0, (0, 2)), (2, (2, 0))):
        dec = BatchDecoder("cpu")
        for batch in torch.utils.data.DataLoader(ds, batch_size=4, num_workers=num_workers,
                                                 collate_fn=collate_encoded):
            dec(batch)
        summary = dec.summary()
        assert (summary["workers"], summary.get("in_process", 0)) == want, num_workers
        assert summary["gpu"] == 0 and "main_cpu" not in summary


def test_device_jpeg_decode_without_cuda_warns_once_and_is_not_counted_as_gpu(odd_files, caplog):
    ds = EncodedImageFiles.from_folder(odd_files, jpeg_decode="device")
    good = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("a_good.jpg")][0]
    dec = BatchDecoder("cpu")
    with caplog.at_level(logging.WARNING):
        dec(collate_encoded([ds[good]]))
        dec(collate_encoded([ds[good]]))
    assert caplog.text.count("data.jpeg_decode=device without CUDA") == 1
    summary = dec.summary()
    assert summary["gpu"] == 0 and summary["main_cpu"] == 2


def test_in_memory_pipeline_summary_names_the_files_left_out_at_load():
    images = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    pipe = FinetunePipeline(None, "cpu", images, torch.tensor([0, 1]), dropped=["/d/a/x.jpg", "/d/b/y.jpg"])
    assert pipe.decoder.summary()["skipped"] == 2
    assert pipe.decoder.summary()["skipped_names"] == ["/d/a/x.jpg", "/d/b/y.jpg"]
