"""Webdataset shards that cannot be read: named through beit's logger and counted, not webdataset's raw warning."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from beit.data.datasets import WebDatasetShards


def _shards(root: Path) -> tuple[Path, Path]:
    import webdataset as wds

    root.mkdir()
    good, bad = root / "good-0000.tar", root / "good-0001.tar"
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(good)) as w:
        for i in range(5):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
            w.write({"__key__": f"k{i}", "png": buf.getvalue()})
    bad.write_bytes(rng.integers(0, 255, 4000, dtype=np.uint8).tobytes())
    return good, bad


def test_a_garbage_shard_among_good_ones_is_named_and_counted(tmp_path: Path, caplog) -> None:
    good, bad = _shards(tmp_path / "sh")
    ds = WebDatasetShards(str(tmp_path / "sh" / "good-{0000..0001}.tar"), shuffle_shards=False)
    with warnings.catch_warnings(record=True) as raw, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        images = list(ds)
    assert len(images) == 5
    assert not [w for w in raw if "ReadError" in str(w.message)]  # not webdataset's bare UserWarning
    assert f"skipping webdataset shard {bad} (ReadError" in caplog.text
    assert "BufferedReader" not in caplog.text
    assert ds.skipped_count() == 1 and ds.skipped_count(0) == 1 and ds.bad_keys == [str(bad)]
    assert ds.no_batch_message(4).startswith(f"the webdataset shards {tmp_path / 'sh' / 'good-{0000..0001}.tar'} "
                                             "(2 shards) yield no full batch of 4: 1 shard read(s) failed")
