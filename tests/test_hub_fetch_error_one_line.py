"""A checkpoint given as ``owner/name`` that is neither a local path nor fetchable from the Hub: one line that says
both, and a likely misspelt local path as such. The message was huggingface_hub's, over several lines, so that the
CLI's one line ended mid-sentence ("... (Got: ConnectError: [Errno -2] Name or service not known") and never said
that no local file of that name exists."""

from __future__ import annotations

import pytest

import beit
from beit.interop import CheckpointError


def _offline(*args, **kwargs):
    raise OSError("Got: ConnectError: [Errno -2] Name or service not known\nAn error happened while trying to "
                  "locate the files on the Hub. Please check your internet connection and try again.")


def test_an_unfetchable_hub_id_is_one_line_naming_a_likely_local_typo(tmp_path, monkeypatch) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _offline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(CheckpointError) as e:
        beit.load_model("runs/finall")
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("Name or service not known)")
    assert msg.startswith("'runs/finall': no such local file or folder (runs/ is a folder here: a misspelt path?), "
                          "and it could not be fetched as a Hugging Face Hub id")
    with pytest.raises(CheckpointError, match=r"^'microsoft/beit-x': no such local file or folder, and it could not"):
        beit.load_model("microsoft/beit-x")
