"""Folder, labeled, in-memory and webdataset datasets: robustness, errors, seeding."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageOps

from beit.data.datasets import (
    ImageFolderDataset,
    LabeledImageFolder,
    TensorImageDataset,
    WebDatasetShards,
    decode_image,
    list_images,
    load_image_folder_to_memory,
)
from beit.data.transforms import PretrainTransform


def _rgb(size: int = 24, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _make_odd_folder(root: Path) -> dict[str, Path]:
    """One file per awkward case; names sort in this order."""
    files = {}
    files["a_rgb"] = _save(_rgb(24, 1), root / "a_rgb.jpg")
    files["b_cmyk"] = _save(_rgb(24, 2).convert("CMYK"), root / "b_cmyk.jpg")
    files["c_gray"] = _save(_rgb(24, 3).convert("L"), root / "sub" / "c_gray.png")
    files["d_la"] = _save(_rgb(24, 4).convert("LA"), root / "sub" / "d_la.png")
    pal = _rgb(24, 5).convert("P")
    pal.info["transparency"] = 0
    files["e_pal"] = _save(pal, root / "sub" / "deeper" / "e_pal.png")
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:12, :, 3] = 255  # top opaque red, bottom fully transparent
    files["f_rgba"] = _save(Image.fromarray(rgba, "RGBA"), root / "f_rgba.png")
    files["g_16bit"] = _save(Image.fromarray(np.full((24, 24), 128 * 257, np.uint16)), root / "g_16bit.png")
    trunc = root / "h_truncated.jpg"
    trunc.write_bytes(_jpeg_bytes(_rgb(64, 6))[:600])
    files["h_truncated"] = trunc
    junk = root / "i_random.jpg"
    junk.write_bytes(np.random.default_rng(7).integers(0, 256, 500, dtype=np.uint8).tobytes())
    files["i_random"] = junk
    files["j_rgb"] = _save(_rgb(24, 8), root / "j_rgb.PNG")  # upper-case extension
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(b"junk")
    (root / "._a_rgb.jpg").write_bytes(b"macOS metadata")
    return files


def test_folder_lists_sorted_recursive_and_skips_hidden(tmp_path: Path) -> None:
    files = _make_odd_folder(tmp_path)
    paths = list_images(tmp_path)
    rel = [Path(p).relative_to(tmp_path).as_posix() for p in paths]
    assert rel == sorted(rel) and len(rel) == 10
    assert not any(".hidden" in r or r.startswith("._") for r in rel)
    flat = list_images(tmp_path, recursive=False)
    assert len(flat) == 7 and str(files["c_gray"]) not in flat


def test_odd_modes_convert_and_corrupt_files_are_skipped_and_counted(tmp_path: Path, caplog) -> None:
    files = _make_odd_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 10
    with caplog.at_level(logging.WARNING, logger="beit.data.datasets"):
        for _ in range(2):  # two epochs: each bad file is warned about once
            samples = [ds[i] for i in range(len(ds))]
    assert all(s.mode == "RGB" and s.size == (24, 24) for s in samples)
    assert ds.num_skipped == 2
    assert ds.bad_paths == [str(files["h_truncated"]), str(files["i_random"])]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "h_truncated.jpg" in warned[0] and "i_random.jpg" in warned[1]
    # the replacement of a bad index is the next readable sample, deterministically
    order = [Path(p).stem for p in ds.paths]
    j = order.index("j_rgb")
    assert np.array_equal(np.asarray(samples[order.index("h_truncated")]), np.asarray(samples[j]))
    # 16-bit data is rescaled, not clipped to white; alpha is composited on white
    g = np.asarray(samples[order.index("g_16bit")])
    assert (g == 128).all()
    f = np.asarray(samples[order.index("f_rgba")])
    assert (f[:12] == [200, 0, 0]).all() and (f[12:] == 255).all()


def test_verify_finds_bad_files_up_front(tmp_path: Path) -> None:
    files = _make_odd_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path)
    assert ds.verify(num_threads=2) == [str(files["h_truncated"]), str(files["i_random"])]
    assert ds.num_skipped == 2


def test_all_bad_raises_clearly(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"nope")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(RuntimeError, match="none of the 1 images"):
        ds[0]
    with pytest.raises(ValueError, match="none of the 1 images"):  # a data problem: the CLI prints one line
        ds[0]


def test_missing_empty_and_file_roots_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        ImageFolderDataset(missing)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty_dir"):
        ImageFolderDataset(empty)
    f = _save(_rgb(), tmp_path / "one.jpg")
    with pytest.raises(NotADirectoryError, match="one.jpg"):
        ImageFolderDataset(f)
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        LabeledImageFolder(missing)


def _make_labeled(root: Path, classes: dict[str, int]) -> None:
    for k, (name, n) in enumerate(classes.items()):
        for i in range(n):
            _save(_rgb(20, 10 * k + i), root / name / f"{i:02d}.jpg")


def test_labeled_folder_labels_and_class_names(tmp_path: Path) -> None:
    _make_labeled(tmp_path, {"cat": 2, "dog": 3, "ant": 1})
    (tmp_path / "dog" / "nested").mkdir()
    _save(_rgb(20, 99), tmp_path / "dog" / "nested" / "x.png")
    ds = LabeledImageFolder(tmp_path)
    assert ds.classes == ["ant", "cat", "dog"]
    assert ds.targets == [0, 1, 1, 2, 2, 2, 2]
    img, label = ds[3]
    assert img.mode == "RGB" and label == 2
    ds2 = LabeledImageFolder(tmp_path, class_names=["dog", "cat", "ant"])
    assert ds2.class_to_idx == {"dog": 0, "cat": 1, "ant": 2}
    assert sorted(ds2.targets) == [0, 0, 0, 0, 1, 1, 2]


def test_labeled_folder_errors(tmp_path: Path) -> None:
    _make_labeled(tmp_path, {"cat": 1, "dog": 1})
    with pytest.raises(ValueError, match=r"no folder for \['bird'\]; folders not in class_names: \['dog'\]"):
        LabeledImageFolder(tmp_path, class_names=["cat", "bird"])
    with pytest.raises(ValueError, match=r"^class_names has names given more than once: 'cat' \(2 times\)$"):
        LabeledImageFolder(tmp_path, class_names=["cat", "cat", "dog"])
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class"):
        LabeledImageFolder(tmp_path)
    flat = tmp_path / "flat"
    flat.mkdir()
    _save(_rgb(), flat / "a.jpg")
    with pytest.raises(ValueError, match="no class sub-folders"):
        LabeledImageFolder(flat)


def test_labeled_replacement_keeps_image_label_pairs(tmp_path: Path) -> None:
    _make_labeled(tmp_path, {"a": 1, "b": 2})
    (tmp_path / "a" / "zz_bad.jpg").write_bytes(b"\xff\xd8broken")
    ds = LabeledImageFolder(tmp_path)
    img, label = ds[1]  # a/zz_bad.jpg -> replaced by b/00.jpg, with b's label
    ref, ref_label = ds[2]
    assert label == ref_label == 1 and np.array_equal(np.asarray(img), np.asarray(ref))
    assert ds.num_skipped == 1 and ds.bad_paths[0].endswith("zz_bad.jpg")


def test_dataset_augmentation_is_pure_in_seed_epoch_index(tmp_path: Path) -> None:
    _make_labeled(tmp_path, {"a": 2, "b": 2})
    ds = LabeledImageFolder(tmp_path, PretrainTransform(32, 4, 4), seed=3)
    a, b = ds[1][0], ds[1][0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ds.set_epoch(1)
    c = ds[1][0]
    assert not torch.equal(a["image"], c["image"])
    d = ds[(0, 1)][0]  # explicit (epoch, index), as a persistent-worker sampler would pass
    assert torch.equal(a["image"], d["image"]) and torch.equal(a["mask"], d["mask"])
    other = LabeledImageFolder(tmp_path, PretrainTransform(32, 4, 4), seed=4)
    assert not torch.equal(a["image"], other[(0, 1)][0]["image"])
    with pytest.raises(IndexError):
        ds[4]


def test_tensor_dataset_layouts_and_transform() -> None:
    rng = np.random.default_rng(0)
    hwc = torch.from_numpy(rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    chw = hwc.permute(0, 3, 1, 2).clone()
    a, b = TensorImageDataset(hwc), TensorImageDataset(chw, labels=[0, 1, 2, 3, 4])
    assert torch.equal(a[2], hwc[2]) and a[2].shape == (16, 16, 3)
    x, y = b[3]
    assert torch.equal(x, hwc[3]) and y == 3
    gray = TensorImageDataset(hwc[..., 0])
    assert gray[0].shape == (16, 16, 3)
    tf = TensorImageDataset(hwc, transform=PretrainTransform(16, 4, 4), seed=1)
    s1, s2 = tf[0], tf[0]
    assert s1["image"].shape == (3, 16, 16) and torch.equal(s1["image"], s2["image"])
    with pytest.raises(TypeError, match="uint8"):
        TensorImageDataset(hwc.float())
    with pytest.raises(ValueError, match="labels"):
        TensorImageDataset(hwc, labels=[0, 1])


def test_load_folder_to_memory(tmp_path: Path) -> None:
    _make_labeled(tmp_path, {"x": 3, "y": 2})
    (tmp_path / "y" / "bad.jpg").write_bytes(b"garbage")
    images, labels, names = load_image_folder_to_memory(tmp_path, num_threads=2, progress=False)
    assert images.shape == (5, 20, 20, 3) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1] and names == ["x", "y"]
    ref = np.asarray(decode_image(tmp_path / "x" / "01.jpg"))
    assert np.array_equal(images[1].numpy(), ref)
    _save(_rgb(40, 50).resize((40, 30)), tmp_path / "x" / "wide.png")
    # issue 14.8: one odd-sized image is resized to the common size (named in a warning), not refused
    mixed, mixed_labels, _ = load_image_folder_to_memory(tmp_path, progress=False)
    assert mixed.shape == (6, 20, 20, 3) and mixed_labels.tolist() == [0, 0, 0, 0, 1, 1]
    wide = ImageOps.fit(decode_image(tmp_path / "x" / "wide.png"), (20, 20), method=Image.BICUBIC)
    assert np.array_equal(mixed[3].numpy(), np.asarray(wide))
    images, labels, _ = load_image_folder_to_memory(tmp_path, size=16, progress=False)
    assert images.shape == (6, 16, 16, 3)
    flat_images, flat_labels, flat_names = load_image_folder_to_memory(tmp_path / "x", progress=False, size=8)
    assert flat_images.shape == (4, 8, 8, 3) and flat_labels is None and flat_names == []


def _write_shards(root: Path, n_shards: int = 4, per_shard: int = 3, bad_key: str | None = None) -> list[str]:
    urls = []
    k = 0
    for s in range(n_shards):
        url = str(root / f"shard-{s:04d}.tar")
        with wds.TarWriter(url) as sink:
            for _ in range(per_shard):
                key = f"sample{k:04d}"
                img = _rgb(20, k)
                sample = {"__key__": key, "cls": str(k % 3).encode()}
                if key == bad_key:
                    sample["jpg"] = b"\x00" * 50
                elif k % 2:
                    buf = io.BytesIO()
                    img.save(buf, format="PNG")
                    sample["png"] = buf.getvalue()
                else:
                    sample["jpg"] = _jpeg_bytes(img)
                sink.write(sample)
                k += 1
        urls.append(url)
    return urls


def test_webdataset_shards_round_trip(tmp_path: Path) -> None:
    urls = _write_shards(tmp_path, bad_key="sample0004")
    ds = WebDatasetShards(urls, label_key="cls", shuffle_shards=False)
    got = list(ds)
    assert len(got) == 11 and ds.num_skipped == 1 and "sample0004" in ds.bad_keys[0]
    assert [lbl for _, lbl in got][:4] == [0, 1, 2, 0]  # sample0000..0003
    img0 = got[0][0]
    assert img0.mode == "RGB" and img0.size == (20, 20)
    assert np.array_equal(np.asarray(img0), np.asarray(decode_image(_jpeg_bytes(_rgb(20, 0)))))
    # brace notation works and the unlabeled form yields bare samples
    pattern = str(tmp_path / "shard-{0000..0003}.tar")
    assert len(list(WebDatasetShards(pattern))) == 11
    with pytest.raises(FileNotFoundError, match="shard-9999"):
        WebDatasetShards([str(tmp_path / "shard-9999.tar")])


@pytest.mark.parametrize("where", ["between samples", "inside a header", "inside a member"])
def test_a_truncated_shard_is_named_and_counted_once(tmp_path: Path, where: str, beit_warnings) -> None:
    """A shard cut short (a copy that did not finish) ended its stream silently when the cut fell between members
    or inside a header (tarfile reads that as the end of the archive), and a cut inside a member's data was counted
    twice, once as shard '?'. Now every cut is one failed shard, named and counted like an unreadable one; the
    samples before the cut and the other shards are still read."""
    import tarfile

    urls = _write_shards(tmp_path, n_shards=2, per_shard=3)
    with tarfile.open(urls[0]) as tar:
        members = tar.getmembers()
    third = members[4]  # sample0002's first file: the cut leaves sample0000 and sample0001 whole
    cut = {"between samples": third.offset, "inside a header": third.offset + 100,
           "inside a member": members[3].offset_data + members[3].size // 2}[where]
    data = Path(urls[0]).read_bytes()
    Path(urls[0]).write_bytes(data[:cut])
    ds = WebDatasetShards(urls, label_key="cls", shuffle_shards=False)
    got = list(ds)
    kept = 2 if where != "inside a member" else 1  # sample0001 loses its image when its member is cut
    assert len(got) == kept + 3
    assert ds.bad_keys[0] == urls[0] and ds._bad_shards.total() == 1
    assert ds.skipped_count() == (1 if where != "inside a member" else 2)  # + sample0001 without its image
    shard_lines = [r.getMessage() for r in beit_warnings if "skipping webdataset shard" in r.getMessage()]
    assert len(shard_lines) == 1 and shard_lines[0].startswith(f"skipping webdataset shard {urls[0]} (ReadError: ")
    if where != "inside a member":
        assert f"the data ends at byte {third.offset}" in shard_lines[0]
        assert "before the tar's end-of-archive marker: cut short?" in shard_lines[0]
    # a whole shard, or one that lost only the zero blocks after its end-of-archive marker, is no failure
    Path(urls[0]).write_bytes(data)
    assert len(list(WebDatasetShards(urls, label_key="cls", shuffle_shards=False))) == 6
    last = members[-1]
    Path(urls[0]).write_bytes(data[:last.offset_data + -(-last.size // 512) * 512 + 512])  # one zero block kept
    whole = WebDatasetShards(urls, label_key="cls", shuffle_shards=False)
    assert len(list(whole)) == 6 and whole.skipped_count() == 0


def test_webdataset_augmentation_depends_on_key_not_order(tmp_path: Path) -> None:
    urls = _write_shards(tmp_path)
    tf = PretrainTransform(16, 4, 4)
    plain = {
        i: s["image"] for i, (s, _) in enumerate(WebDatasetShards(urls, tf, label_key="cls", shuffle_shards=False))
    }
    shuffled = WebDatasetShards(urls, tf, label_key="cls", shuffle_shards=True, shuffle_buffer=4, seed=0)
    out = list(shuffled)
    assert len(out) == 12
    keyed = {tuple(s["image"].flatten()[:8].tolist()) for s, _ in out}
    assert keyed == {tuple(v.flatten()[:8].tolist()) for v in plain.values()}
    shuffled.set_epoch(1)
    keyed1 = {tuple(s["image"].flatten()[:8].tolist()) for s, _ in shuffled}
    assert keyed1 != keyed


def test_webdataset_split_by_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks shuffle shards identically, then read disjoint halves that cover the whole set."""
    urls = _write_shards(tmp_path)
    everything = {np.asarray(img).tobytes() for img in WebDatasetShards(urls)}
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        part = [np.asarray(img).tobytes() for img in WebDatasetShards(urls, seed=1)]
        assert len(part) == 6
        seen.append(set(part))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == everything


def test_webdataset_too_few_shards_for_the_readers_is_said_by_rank_0(tmp_path: Path, monkeypatch,
                                                                     beit_warnings) -> None:
    """Every rank finds alike that there are fewer shards than readers: each said so; rank 0 says it."""
    urls = _write_shards(tmp_path, n_shards=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, warned in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        beit_warnings.clear()
        assert len(list(WebDatasetShards(urls))) == (3 if rank == "0" else 0)
        assert any("1 shards for 2 ranks x 1 workers" in r.getMessage() for r in beit_warnings) == warned


def test_repeated_dataset_passes_are_epochs_of_the_wrapped_dataset() -> None:
    """Item i of epoch e is item i % n of the wrapped dataset at its epoch e * times + i // n."""
    from torch.utils.data import Dataset

    from beit.data import RepeatedDataset

    class EpochEcho(Dataset):
        def __init__(self) -> None:
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> tuple[int, int]:
            return self.epoch, i

    rep = RepeatedDataset(EpochEcho(), 2)
    rep.set_epoch(5)
    assert len(rep) == 6
    assert [rep[i] for i in range(6)] == [(10, 0), (10, 1), (10, 2), (11, 0), (11, 1), (11, 2)]
    once = RepeatedDataset(EpochEcho(), 1)
    once.set_epoch(4)
    assert [once[i] for i in range(3)] == [(4, 0), (4, 1), (4, 2)]  # times=1: the wrapped dataset unchanged
    with pytest.raises(ValueError, match="times must be >= 1, got 0"):
        RepeatedDataset(EpochEcho(), 0)
    with pytest.raises(ValueError, match="RepeatedDataset needs a dataset with set_epoch\\(epoch\\); list has none"):
        RepeatedDataset([1, 2], 2)


def test_repeated_dataset_counts_the_skips_of_all_its_passes_in_its_epoch() -> None:
    """The engine asks for the skips of its epoch e: with data.repeat=2 those are the wrapped dataset's epochs
    2e and 2e + 1 (it asked the wrapped dataset for its epoch e: other passes' counts, or none)."""
    from torch.utils.data import Dataset

    from beit.data import RepeatedDataset

    class Skips(Dataset):
        counts = {0: 1, 1: 2, 2: 4, 3: 8}

        def set_epoch(self, epoch: int) -> None: ...

        def __len__(self) -> int:
            return 3

        def skipped_count(self, epoch: int | None = None) -> int:
            return sum(self.counts.values()) if epoch is None else self.counts.get(epoch, 0)

    rep = RepeatedDataset(Skips(), 2)
    assert (rep.skipped_count(0), rep.skipped_count(1), rep.skipped_count()) == (3, 12, 15)
    assert RepeatedDataset(Skips(), 1).skipped_count(1) == 2


def test_spread_indices_cover_the_whole_set() -> None:
    from beit.data.datasets import spread_indices

    assert spread_indices(100, 5) == [0, 25, 50, 74, 99]  # not the first 5 (one class of a sorted folder)
    assert spread_indices(3, 8) == [0, 1, 2]
    assert spread_indices(10, 1) == [0] and spread_indices(0, 4) == [] and spread_indices(5, 0) == []
    idx = spread_indices(1437, 8)
    assert len(set(idx)) == 8 and idx == sorted(idx)


@pytest.mark.parametrize("rank, warned", [("0", True), ("1", False)])
def test_folder_to_memory_warns_on_the_first_rank_only(tmp_path: Path, monkeypatch, rank: str, warned: bool,
                                                       beit_warnings) -> None:
    """Under torchrun every rank decodes the same folder: the resize warning comes once (rank 0), the data alike."""
    _make_labeled(tmp_path, {"x": 2})
    _save(_rgb(40, 50).resize((40, 30)), tmp_path / "x" / "wide.png")
    monkeypatch.setenv("RANK", rank)
    images, _, _ = load_image_folder_to_memory(tmp_path, progress=False)
    assert images.shape == (3, 20, 20, 3)
    assert any("resized 1 of 3 images" in r.getMessage() for r in beit_warnings) == warned


def test_class_folders_say_what_a_folder_without_classes_holds(tmp_path: Path) -> None:
    """A folder of images without class sub-folders (one class's folder given by mistake) is refused naming the
    folder, the layout it needs and what it holds, before any image is decoded."""
    from beit.data.datasets import class_folders

    flat = tmp_path / "cat"
    for i in range(3):
        _save(_rgb(8, i), flat / f"{i}.png")
    (flat / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"'.*cat' has 3 images but no class sub-folders: the ImageFolder layout "
                                         r"<dir>/<class>/<image> .*found 3 images directly in it \(0.png, 1.png, "
                                         r"2.png\) \(and 1 other files\)\. If it holds the images of one class"):
        class_folders(flat)
    with pytest.raises(ValueError, match="has 3 images but no class sub-folders.*ImageFolderDataset"):
        LabeledImageFolder(flat)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders and no images.*found nothing: it is empty"):
        class_folders(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"found 1 files that are not images \(a.txt\)"):
        class_folders(tmp_path / "text")
    assert class_folders(tmp_path) == ["cat", "empty", "text"]


def test_in_memory_drops_are_named_and_counted_once_in_the_first_epoch(tmp_path: Path, monkeypatch,
                                                                         beit_warnings) -> None:
    """Files an in-memory folder leaves out at load are the dataset's skips (the engine's ``skipped_count``):
    in the first epoch trained (where a run starts or resumes), on the first rank only; the warning says they are
    left out, not replaced."""
    from beit.data.datasets import decode_image_folder

    _make_labeled(tmp_path, {"x": 3, "y": 2})
    (tmp_path / "y" / "bad.jpg").write_bytes(b"garbage")
    images, labels, names, dropped = decode_image_folder(tmp_path, num_threads=2, progress=False)
    assert images.shape[0] == 5 and dropped == [str(tmp_path / "y" / "bad.jpg")]
    shown = [r.getMessage() for r in beit_warnings if "bad.jpg" in r.getMessage()]
    assert shown and all("left out of the images decoded into memory" in m for m in shown), shown
    assert not any("replacement" in r.getMessage() for r in beit_warnings)

    fresh = TensorImageDataset(images, labels, dropped=dropped)
    assert fresh.num_skipped == 1 and fresh.bad_paths == dropped
    assert [fresh.skipped_count(e) for e in (0, 1)] == [1, 0] and fresh.skipped_count() == 1
    resumed = TensorImageDataset(images, labels, dropped=dropped)
    resumed.set_epoch(3)  # the trainer sets the epoch it starts at before its loader
    resumed.set_epoch(4)
    assert [resumed.skipped_count(e) for e in (0, 3, 4)] == [0, 1, 0]
    assert TensorImageDataset(images, labels).skipped_count() == 0
    monkeypatch.setenv("RANK", "1")  # every rank decodes the whole folder: the engine sums ranks, rank 0 counts
    other_rank = TensorImageDataset(images, labels, dropped=dropped)
    assert other_rank.num_skipped == 1 and other_rank.skipped_count(0) == 0


def test_quiet_console_hides_the_decoding_progress_bars(tmp_path: Path, capsys) -> None:
    """beit demo runs its later seeds quietly: their in-memory decoding printed a progress bar each all the same."""
    from beit.data.datasets import decode_image_folder
    from beit.engine.logging import quiet_console

    _make_labeled(tmp_path, {"x": 2, "y": 2})
    decode_image_folder(tmp_path, num_threads=1)
    assert "decoding" in capsys.readouterr().err
    with quiet_console():
        decode_image_folder(tmp_path, num_threads=1)
    assert "decoding" not in capsys.readouterr().err
    decode_image_folder(tmp_path, num_threads=1)  # shown again after the block
    assert "decoding" in capsys.readouterr().err


def test_check_writable_folder_refuses_before_the_work(tmp_path) -> None:
    """An output folder is checked before the work that fills it: a dangling link in its path (mkdir fails there
    with "File exists" after the work), a file in the way; a writable new or existing folder passes and the probe
    file leaves nothing behind."""
    from beit.data.datasets import check_writable_folder

    check_writable_folder(tmp_path, "--out X")
    check_writable_folder(tmp_path / "new" / "deeper", "--out X")
    assert list(tmp_path.iterdir()) == []
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    for folder in (link, link / "sub"):
        with pytest.raises(ValueError, match=f"^--out X: {link} is a link to {tmp_path / 'nowhere'}, which does not "
                                             "exist$"):
            check_writable_folder(folder, "--out X")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=f"^--out X: {tmp_path / 'f'} is a file, not a folder$"):
        check_writable_folder(tmp_path / "f" / "sub", "--out X")


def test_the_advice_for_a_class_folder_without_images_works(tmp_path) -> None:
    """A training class folder without images: the error's advice is one that works. It said "remove them or pass
class_names without them", and class_names without a folder is refused ("folders not in class_names: ...")."""
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "a.png")
    with pytest.raises(ValueError, match=r"\['dog'\].*put images in them or remove them") as e:
        LabeledImageFolder(tmp_path)
    assert "pass class_names without them" not in str(e.value)
    with pytest.raises(ValueError, match=r"folders not in class_names: \['dog'\]"):  # why the hint leaves it out
        LabeledImageFolder(tmp_path, class_names=["cat"])
    (tmp_path / "dog").rmdir()
    assert LabeledImageFolder(tmp_path).classes == ["cat"]
