"""A training class folder without images: the error's advice is one that works. It said "remove them or pass
class_names without them", and class_names without a folder is refused ("folders not in class_names: ...")."""

from __future__ import annotations

import pytest
from PIL import Image

from beit.data.datasets import LabeledImageFolder


def test_the_advice_for_a_class_folder_without_images_works(tmp_path) -> None:
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
