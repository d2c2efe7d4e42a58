"""engine/prefetch.py: batches moved and transformed one step ahead (side CUDA stream), same results as a plain loop."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from beit.engine.prefetch import DevicePrefetcher, to_device

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, 3, 8, 8, generator=g), "i": torch.tensor([k])} for k in range(n)]


def _transform(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    x = batch["x"]
    for _ in range(20):  # enough kernels that a missing stream wait would show
        x = torch.tanh(x * 1.01 + 0.1)
    return {"y": x.sum(dim=(1, 2, 3)), "i": batch["i"]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefetch", [False, True])
def test_prefetched_batches_equal_a_plain_loop(device: str, prefetch: bool) -> None:
    raw = _batches(5)
    expected = [_transform(to_device(b, torch.device(device))) for b in raw]
    pf = DevicePrefetcher(iter(raw), device, _transform)
    got = []
    for _ in range(5):
        b = next(pf)
        got.append(b)
        # the "step": main-stream work on the batch, queued before the next one is prefetched
        b["y"].mul_(1.0)
        if prefetch:
            pf.prefetch()
    with pytest.raises(StopIteration):
        next(pf)
    assert [int(b["i"]) for b in got] == [0, 1, 2, 3, 4]
    for e, b in zip(expected, got):
        assert b["y"].device.type == torch.device(device).type
        torch.testing.assert_close(b["y"], e["y"])


def test_prefetch_at_the_end_is_harmless_and_plain_move_without_transform() -> None:
    pf = DevicePrefetcher(iter([torch.ones(2)]), "cpu")
    pf.prefetch()  # no-op on CPU: batches are prepared when taken
    assert torch.equal(next(pf), torch.ones(2))
    pf.prefetch()
    with pytest.raises(StopIteration):
        next(pf)
    assert list(DevicePrefetcher(iter([]), "cpu", _transform)) == []


def test_cpu_prepares_lazily_in_order() -> None:
    """Without CUDA nothing is drawn from the loader before it is asked for (a plain loop's order)."""
    calls: list[int] = []

    def gen():
        for k in range(3):
            calls.append(k)
            yield torch.tensor([k])

    pf = DevicePrefetcher(gen(), "cpu", lambda b: b + 10)
    pf.prefetch()
    assert calls == []
    assert int(next(pf)) == 10 and calls == [0]


def test_to_device_keeps_structure_and_passes_other_objects() -> None:
    Pair = namedtuple("Pair", "a b")
    obj = object()
    out = to_device({"p": Pair(torch.zeros(1), [torch.ones(1), obj]), "s": "name"}, torch.device("cpu"))
    assert isinstance(out["p"], Pair) and out["p"].b[1] is obj and out["s"] == "name"
    assert torch.equal(out["p"].b[0], torch.ones(1))


def test_loader_error_propagates() -> None:
    def broken():
        yield torch.zeros(1)
        raise OSError("disk gone: /data/x.jpg")

    pf = DevicePrefetcher(broken(), "cpu")
    next(pf)
    with pytest.raises(OSError, match="disk gone"):
        next(pf)


@pytest.mark.parametrize("device", DEVICES)
def test_an_error_while_prefetching_is_raised_when_that_batch_is_asked_for(device: str) -> None:
    def transform(b: torch.Tensor) -> torch.Tensor:
        if int(b[0]) == 1:
            raise ValueError("no image of the batch could be decoded: ['a.jpg']")
        return b

    pf = DevicePrefetcher(iter([torch.tensor([0]), torch.tensor([1])]), device, transform)
    assert int(next(pf)) == 0
    pf.prefetch()  # the step in flight goes on: nothing raised here
    with pytest.raises(ValueError, match="a.jpg"):
        next(pf)
