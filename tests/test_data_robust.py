"""Issue 14, items 6-9: folders with links, small and thin images, odd sizes in memory, EXIF orientation,
skip counts shared with DataLoader workers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from beit.data.datasets import (
    ImageFolderDataset,
    LabeledImageFolder,
    decode_image,
    decode_image_matching,
    find_classes,
    list_images,
    scan_images,
)
from beit.data.transforms import (
    EnsureMinSize,
    PretrainTransform,
    build_eval_transform,
    build_finetune_transform,
    build_linear_probe_transform,
)


def _img(path: Path, size: tuple[int, int] = (12, 12), value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def _labeled(root: Path) -> None:
    for c, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            _img(root / c / f"{i}.png", value=10 * i)


# --------------------------------------------------------------------------------------- 14.6 links
def test_dir_links_to_itself_and_parent_list_each_image_once(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _labeled(root)
    os.symlink(".", root / "cat" / "self")  # link to itself
    os.symlink("..", root / "dog" / "up")  # link to the parent (the dataset root)
    os.symlink("../cat", root / "dog" / "to_cat")  # link to another class
    expected = [str(root / c / f"{i}.png") for c, n in (("cat", 2), ("dog", 3)) for i in range(n)]
    assert list_images(root) == expected
    # from inside 'dog': its own images, then cat's once (through to_cat; 'up' adds nothing new)
    dog = root / "dog"
    assert list_images(dog) == [str(dog / f"{i}.png") for i in range(3)] + [
        str(dog / "to_cat" / f"{i}.png") for i in range(2)]
    ds = LabeledImageFolder(root)
    assert ds.classes == ["cat", "dog"]
    assert ds.samples == [(p, 0) for p in expected[:2]] + [(p, 1) for p in expected[2:]]
    assert len(ImageFolderDataset(root)) == 5


def test_linked_class_folder_outside_the_root_is_followed(tmp_path: Path) -> None:
    _img(tmp_path / "elsewhere" / "a.png")
    root = tmp_path / "data"
    _img(root / "real" / "b.png")
    os.symlink(tmp_path / "elsewhere", root / "linked")
    assert find_classes(root) == ["linked", "real"]
    ds = LabeledImageFolder(root)
    assert ds.samples == [(str(root / "linked" / "a.png"), 0), (str(root / "real" / "b.png"), 1)]


def test_file_link_loop_and_dangling_link_are_skipped_and_named(tmp_path: Path, caplog) -> None:
    root = tmp_path / "data"
    _labeled(root)
    os.symlink("loop_b.jpg", root / "loop_a.jpg")
    os.symlink("loop_a.jpg", root / "loop_b.jpg")
    os.symlink("loop_b", root / "loop_c")  # no image suffix, at the top: no class either
    os.symlink("loop_c", root / "loop_b")
    os.symlink(tmp_path / "missing.png", root / "cat" / "gone.png")
    os.symlink(".", root / "again")  # a top-level link to the root is not a class
    with caplog.at_level(logging.WARNING, logger="beit.data.datasets"):
        assert find_classes(root) == ["cat", "dog"]
    assert "loop_c" in caplog.text and "Too many levels of symbolic links" in caplog.text
    assert "again" in caplog.text and "contains the image folder itself" in caplog.text
    scan = scan_images(root)
    assert len(scan.paths) == 5
    assert [Path(p).name for p, _ in scan.skipped] == ["gone.png", "loop_a.jpg", "loop_b", "loop_b.jpg", "loop_c"]
    assert scan.skipped[0][1] == "FileNotFoundError: No such file or directory"
    assert scan.skipped[1][1] == "OSError: Too many levels of symbolic links"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="beit.data.datasets"):
        ds = LabeledImageFolder(root)
    assert len(ds) == 5 and ds.unreadable_entries == scan.skipped
    assert "skipped 5 unreadable entries" in caplog.text and "gone.png" in caplog.text


def test_under_torchrun_unreadable_entries_are_named_by_rank_0(tmp_path: Path, monkeypatch, beit_warnings) -> None:
    """Every rank scans the same folder: each named the same unreadable entries (a dangling link, a link loop), the
    same warning once per rank. Rank 0 names them; another rank finds them alike (``unreadable_entries``), quietly."""
    root = tmp_path / "data"
    _labeled(root)
    os.symlink(tmp_path / "missing.png", root / "cat" / "gone.png")
    os.symlink("loop_b", root / "loop_a")
    os.symlink("loop_a", root / "loop_b")
    found = {}
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        beit_warnings.clear()
        ds = LabeledImageFolder(root)
        found[rank] = (ds.samples, ds.unreadable_entries, list_images(root), ImageFolderDataset(root).paths)
        said = [r.getMessage() for r in beit_warnings]
        if rank == "0":
            assert said and all("unreadable entries" in m for m in said), said
            assert any("gone.png" in m for m in said) and any("loop_a" in m for m in said), said
        else:
            assert said == [], said
    assert found["0"] == found["1"] and len(found["0"][1]) == 3


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_unreadable_folder_is_skipped_and_named(tmp_path: Path) -> None:
    _img(tmp_path / "ok" / "a.png")
    _img(tmp_path / "locked" / "b.png")
    os.chmod(tmp_path / "locked", 0)
    try:
        scan = scan_images(tmp_path)
    finally:
        os.chmod(tmp_path / "locked", 0o755)
    assert scan.paths == [str(tmp_path / "ok" / "a.png")]
    assert scan.skipped[0][0] == str(tmp_path / "locked") and "PermissionError" in scan.skipped[0][1]


# --------------------------------------------------------------------------------------- 14.7 small images
@pytest.mark.parametrize("size", [(9, 9), (2000, 10), (10, 2000), (1, 1)])
def test_small_and_thin_images_through_train_transforms(size: tuple[int, int]) -> None:
    img = Image.new("RGB", size, (200, 100, 50))
    for side, tf in ((32, build_finetune_transform(True, 32)), (32, build_linear_probe_transform(True, 32)),
                     (16, build_finetune_transform(True, 16, auto_augment=None, re_prob=0.0)),
                     (32, build_eval_transform(32)), (48, build_finetune_transform(True, 48))):
        for seed in range(3):
            torch.manual_seed(seed)
            assert tf(img).shape == (3, side, side)
    out = PretrainTransform(32, 8, 4)(img)
    assert out["image"].shape == (3, 32, 32) and out["tok_image"].shape == (3, 16, 16)


def test_ensure_min_size_keeps_aspect_and_leaves_large_images() -> None:
    assert EnsureMinSize(32)(Image.new("RGB", (2000, 10))).size == (6400, 32)
    assert EnsureMinSize(32)(Image.new("RGB", (9, 9))).size == (32, 32)
    big = Image.new("RGB", (40, 33))
    assert EnsureMinSize(32)(big) is big
    # no padding ends up in the crop: a flat colour stays that colour
    lp = build_linear_probe_transform(True, 32, mean=(0, 0, 0), std=(1, 1, 1))
    torch.manual_seed(1)
    out = lp(Image.new("RGB", (9, 9), (255, 255, 255)))
    assert out.shape == (3, 32, 32) and float(out.min()) >= 0.0


def test_finetune_dataset_epoch_with_tiny_images_and_a_failing_transform(tmp_path: Path, caplog) -> None:
    _img(tmp_path / "a" / "0_tiny.png", (9, 9))
    _img(tmp_path / "a" / "1_thin.png", (2000, 10))
    _img(tmp_path / "b" / "2_ok.png", (40, 40))
    _img(tmp_path / "b" / "3_odd.png", (41, 41))
    tf = build_finetune_transform(True, 32)

    def picky(img: Image.Image) -> torch.Tensor:  # a transform that cannot handle one image
        if img.size == (41, 41):
            raise ValueError("cannot handle 41x41")
        return tf(img)

    ds = LabeledImageFolder(tmp_path, picky)
    with caplog.at_level(logging.WARNING, logger="beit.data.datasets"):
        batch = [ds[i] for i in range(len(ds))]
    assert [x.shape for x, _ in batch] == [(3, 32, 32)] * 4
    assert [y for _, y in batch] == [0, 0, 1, 0]  # 3_odd replaced by the next usable sample (0_tiny)
    assert ds.skipped_count() == 1 and ds.bad_paths == [str(tmp_path / "b" / "3_odd.png")]
    assert "image the transform cannot handle" in caplog.text and "3_odd.png" in caplog.text
    assert ds[(5, 3)][1] == 0 and ds.skipped_count(5) == 1  # a replacement counts in the epoch it was asked for


def test_broken_transform_is_an_error_not_bad_files(tmp_path: Path) -> None:
    for i in range(10):
        _img(tmp_path / f"{i}.png")

    def broken(img: Image.Image) -> None:
        raise TypeError("bug")

    with pytest.raises(RuntimeError, match=r"the transform failed on 8 images in a row \(last .*7.png: "
                                           r"TypeError: bug\): the transform is broken, not the files"):
        ImageFolderDataset(tmp_path, broken)[0]


# --------------------------------------------------------------------------------------- 14.9 EXIF
def _exif_jpeg(path: Path, orientation: int) -> Path:
    arr = np.zeros((20, 40, 3), np.uint8)  # stored: 40 wide x 20 high, left half red, right half blue
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, quality=95, exif=exif)
    return path


def test_exif_orientation_applied_on_decode(tmp_path: Path) -> None:
    path = _exif_jpeg(tmp_path / "camera.jpg", 6)  # 6: rotate 90 degrees clockwise to display
    img = decode_image(path)
    assert img.size == (20, 40)  # upright: 20 wide, 40 high
    arr = np.asarray(img).astype(int)
    assert np.abs(arr[5, 10] - (255, 0, 0)).max() < 20  # the stored left half is now on top
    assert np.abs(arr[35, 10] - (0, 0, 255)).max() < 20
    assert decode_image(path.read_bytes()).size == (20, 40)  # bytes (webdataset) too
    assert decode_image(path, exif=False).size == (40, 20)
    ds = ImageFolderDataset(tmp_path, build_eval_transform(32, mean=(0, 0, 0), std=(1, 1, 1)))
    x = ds[0]
    assert x[0, 2, 16] > 0.9 and x[2, 2, 16] < 0.1  # top of the tensor is red


def test_exif_matching_annotation_size_and_broken_exif(tmp_path: Path) -> None:
    path = _exif_jpeg(tmp_path / "camera.jpg", 6)
    assert decode_image_matching(path, (20, 40)).size == (20, 40)  # annotation made upright
    assert decode_image_matching(path, (40, 20)).size == (40, 20)  # annotation made on the stored pixels
    bad = _exif_jpeg(tmp_path / "weird.jpg", 77)  # out-of-range orientation: pixels as stored
    assert decode_image(bad).size == (40, 20)


# --------------------------------------------------------------------------------------- skip counts
def test_skip_counts_summed_over_two_workers(tmp_path: Path) -> None:
    _labeled(tmp_path)
    (tmp_path / "cat" / "9_bad.jpg").write_bytes(b"\xff\xd8 broken")
    (tmp_path / "dog" / "9_bad.jpg").write_bytes(b"not an image")
    ds = LabeledImageFolder(tmp_path, build_eval_transform(16))
    for epoch in range(2):
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
        assert sum(len(y) for _, y in loader) == 7
    assert ds.skipped_count() == 4  # 2 bad files x 2 epochs, counted in the workers, read in the main process
    assert ds.num_skipped == 2 and ds.bad_paths == [str(tmp_path / "cat" / "9_bad.jpg"),
                                                      str(tmp_path / "dog" / "9_bad.jpg")]


def test_segmentation_pairs_with_exif_rotated_photos(tmp_path: Path) -> None:
    from beit.tasks.segmentation.data import SegmentationDataset

    img = _exif_jpeg(tmp_path / "photo.jpg", 6)  # stored 40x20, upright 20x40
    up = tmp_path / "up.png"
    Image.fromarray(np.ones((40, 20), np.uint8)).save(up)  # mask drawn on the upright photo
    raw = tmp_path / "raw.png"
    Image.fromarray(np.ones((20, 40), np.uint8)).save(raw)  # mask drawn on the stored pixels
    ds = SegmentationDataset([(img, up), (img, raw)], 3, transform=None)
    assert ds.verify() == 0 and len(ds.pairs) == 2  # no bad pair
    a, mask_a = ds.load(0)
    b, mask_b = ds.load(1)
    assert a.size == (20, 40) and mask_a.shape == (40, 20)
    assert b.size == (40, 20) and mask_b.shape == (20, 40)
    assert np.abs(np.asarray(a).astype(int)[5, 10] - (255, 0, 0)).max() < 20  # upright: red on top


def test_segmentation_skips_counted_for_the_engine(tmp_path: Path) -> None:
    from beit.tasks.segmentation.data import SegmentationDataset

    mask = tmp_path / "m.png"
    Image.fromarray(np.ones((6, 8), np.uint8)).save(mask)
    good = _img(tmp_path / "good.png", (8, 6))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    ds = SegmentationDataset([(good, mask), (bad, mask)], 3, on_bad_sample="skip",
                             transform=lambda img, m: (torch.tensor(img.size), torch.tensor(m.shape)))
    loader = DataLoader(ds, batch_size=1, num_workers=2)
    assert [x.tolist() for x, _ in loader] == [[[8, 6]], [[8, 6]]]  # the bad pair replaced by the good one
    assert ds.skipped_count() == 1


def test_first_readable_skips_known_and_new_bad_samples_and_wraps_around():
    """The shared replace-the-unreadable-file loop: known bad samples are not retried, a sample whose read
    raises is reported once and skipped, the search wraps around, and a set with none readable is named."""
    from beit.data.datasets import NoReadableImagesError, first_readable

    bad, reads = {1}, []

    def read(i):
        reads.append(i)
        if i == 2:
            raise OSError("truncated")
        return f"img{i}"

    def mark(i, err):
        bad.add(i)

    assert first_readable(4, 1, bad.__contains__, read, mark, list) == (3, "img3")  # 1 known bad, 2 fails
    assert reads == [2, 3] and bad == {1, 2}
    assert first_readable(4, 2, bad.__contains__, read, mark, list) == (3, "img3")  # 2 is not read again
    assert first_readable(4, 3, {3}.__contains__, read, mark, list)[0] == 0  # wraps around
    with pytest.raises(NoReadableImagesError, match=r"none of the 2 images could be read; first failures: \['a'\]"):
        first_readable(2, 0, lambda i: False, lambda i: 1 / 0, mark, lambda: ["a"])


def test_cpu_path_counts_each_skipped_file_once_an_epoch(tmp_path: Path) -> None:
    """A request passing over two unreadable files counts both (the epoch line counts files, as it names them)."""
    root = tmp_path / "d"
    root.mkdir()
    (root / "a_bad.jpg").write_bytes(b"")
    (root / "b_bad.jpg").write_text("text")
    Image.new("RGB", (8, 8)).save(root / "c_good.png")
    ds = ImageFolderDataset(root)
    ds[(0, 0)]
    assert ds.skipped_count(0) == 2 and ds.num_skipped == 2
    ds[(0, 1)]
    assert ds.skipped_count(0) == 2


def test_undecodable_bytes_and_files_are_named_without_the_stream_object(tmp_path: Path) -> None:
    from PIL import UnidentifiedImageError

    from beit.data.datasets import decode_image

    (tmp_path / "t.jpg").write_text("text")
    for source in (b"garbage", tmp_path / "t.jpg"):
        with pytest.raises(UnidentifiedImageError) as err:
            decode_image(source)
        assert "BytesIO" not in str(err.value) and "BufferedReader" not in str(err.value) and " 0x" not in str(err.value)
