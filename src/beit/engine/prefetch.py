"""Batches moved to the training device, and transformed there, one step ahead on a side CUDA stream.

A task with an on-device input pipeline (nvJPEG decode + per-sample augmentation, ``beit.data.gpu_decode``)
hands it to the :class:`~beit.engine.trainer.Trainer` as ``device_transform``. Run inside the step, its host
work (Python, kernel launches, nvJPEG's host phase) and its kernels would sit between two steps with the GPU
idle; here batch k+1 is moved and transformed right after step k's backward has been queued, on a stream of
its own: the host work hides behind the queued step, the kernels run beside it, and the main stream waits
for the side stream's event only when it takes the batch (the pattern of NVIDIA's apex ``data_prefetcher``
and torchtitan's loaders). Each tensor handed over is marked with ``record_stream`` so the caching allocator
does not reuse its memory before the main stream is done with it.

Without CUDA, or without a transform, there is nothing to overlap: batches are prepared when taken, in order,
exactly as a plain loop.
The transforms of this package draw their random numbers from ``(seed, epoch, index)``, never from a global
generator, so preparing a batch early changes no result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["DevicePrefetcher", "to_device"]


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of ``batch`` (nested dicts, lists, tuples, namedtuples) moved to ``device`` without blocking;
    any other object (e.g. an ``EncodedBatch`` for a device transform) is passed through untouched."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)  # namedtuples too
    return batch


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class DevicePrefetcher:
    """Iterator over ``transform(to_device(batch))`` for the batches of ``batches``.

    Call :meth:`prefetch` when the next batch will be needed and the GPU has work queued (the trainer does
    it right after a step's backward); ``next()`` then hands it over, or prepares it on the spot when none
    is pending.

    Args:
        batches: the loader's batches (CPU, pinned where the loader pins).
        device: the training device; a side stream is used only on CUDA and with a ``transform``.
        transform: ``batch -> batch`` on the device (decode + augmentation), or None for a plain move (made
            when the batch is taken, on the current stream).

    Raises:
        StopIteration: from ``next()`` once ``batches`` is exhausted. Errors of the loader or the transform
            are raised unchanged by the ``next()`` that asks for that batch (also when they happened during
            ``prefetch``, so the step in flight still finishes).
    """

    def __init__(self, batches: Iterator[Any], device: torch.device | str,
                 transform: Callable[[Any], Any] | None = None) -> None:
        self._it = iter(batches)
        self.device = torch.device(device)
        self._transform = transform
        # a side stream only where there is work to overlap: a device transform on CUDA (a plain move of pinned
        # batches is already asynchronous; it stays on the main stream, as before the prefetcher)
        self._stream = (torch.cuda.Stream(self.device) if self.device.type == "cuda" and transform is not None
                        else None)
        self._pending: tuple[Any] | None = None  # a 1-tuple: a prepared batch may itself be None
        self._synced = False
        self._error: Exception | None = None  # of a prefetch, raised by the next next()

    def _prepare(self, raw: Any) -> Any:
        batch = to_device(raw, self.device)
        return self._transform(batch) if self._transform is not None else batch

    def prefetch(self) -> None:
        """Start preparing the next batch on the side stream (no-op without CUDA or a transform, or when one is
        pending).
        At the end of ``batches`` nothing is pending and the next ``next()`` raises ``StopIteration``."""
        if self._stream is None or self._pending is not None:
            return
        try:
            raw = next(self._it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - raised by next(), when the batch is asked for (the step in
            self._error = e  # flight still completes its update)
            return
        main = torch.cuda.current_stream(self.device)
        if not self._synced:  # once: tensors the transform holds (in-memory images) were made on the main stream
            self._stream.wait_stream(main)
            self._synced = True
        try:
            with torch.cuda.stream(self._stream):
                self._pending = (self._prepare(raw),)
        except Exception as e:  # noqa: BLE001 - as above
            self._error = e

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Any:
        if self._error is not None:
            e, self._error = self._error, None
            raise e
        if self._pending is None:
            if self._stream is None:
                return self._prepare(next(self._it))
            self.prefetch()
            if self._pending is None:
                raise StopIteration
        (batch,), self._pending = self._pending, None
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self._stream)  # type: ignore[arg-type]
        for t in _tensors(batch):
            if t.device.type == "cuda":
                t.record_stream(main)
        return batch
