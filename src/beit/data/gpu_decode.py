"""Images for the on-device augmentation: decoded in the loader's workers (default) or on the GPU (nvJPEG).

The loader's workers read each file, parse its header with PIL (format, mode, size, progressive flag, EXIF
orientation) and draw the blockwise mask from a generator seeded by ``(seed, epoch, index)``. Then, by
``jpeg_decode``:

- ``"workers"`` (default): the worker decodes the JPEG too, with libjpeg-turbo (``torchvision.io.decode_jpeg`` on
  CPU, ~0.7 ms for a 500x375 photo on one core: ``benchmarks/cpu_costs.py``), applies the EXIF orientation, cuts the
  image to the crop box the views will use (``crop``: the same (seed, epoch, index) numbers; about half a photo's
  pixels with the recipe's scale range), and the batch's pixels travel as ONE uint8 buffer (made in shared memory),
  pinned by the loader and copied to the GPU in one asynchronous copy. The GPU only augments. This is the default
  because nvJPEG's decode is not free for the GPU: its kernels (and its host stage, on the training process's
  thread) take time from the training step they run beside, while 14 worker cores decode several times faster than a
  BEiT-B step consumes (``benchmarks/data_pipeline.py``, rows ``*_dev`` vs ``*_nvjpeg``; RESULTS.md §9).
- ``"device"``: files the GPU decoder takes (baseline 8-bit 3-channel JPEG) travel as raw bytes and
  ``BatchDecoder`` decodes a batch's bytes in one ``decode_jpeg(list, device=...)`` call (the same code on
  CPU, for tests and laptops): for machines with few CPU cores per GPU.

Every other file (PNG, WebP, CMYK, grayscale, progressive or 12-bit JPEG, ...) is decoded in the worker with
the CPU path's ``decode_image``, counted per reason. A file that cannot be read is skipped and replaced by
the next readable one (as the CPU path does); the batch carries its name, so the main process counts every
skip even with workers. A file nvJPEG rejects after all (corrupt body) is retried alone, then on CPU with
PIL, and if that fails too it is skipped, named and replaced by another image of the batch, so an epoch never
stops. EXIF orientation is applied to every image (PIL's ``ImageOps.exif_transpose`` semantics).

Why torchvision's decoders and not NVIDIA DALI: DALI is a separate CUDA-specific wheel that the training
machines do not carry, and its pipelines own the loader (sharding, seeding, resume), which the engine
already does; torchvision ships with torch. Measure with ``benchmarks/data_pipeline.py`` before reconsidering.

The batch (``EncodedBatch``) is not a tensor, dict or list, so the engine's move to the device passes it
on untouched; the task hands ``PretrainPipeline`` / ``FinetunePipeline`` to the engine as its
``device_transform``, which the engine runs one batch ahead on a side CUDA stream (``beit.engine.prefetch``).
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

from .._text import ALIKE_ON_EVERY_RANK
from .datasets import (
    ImageFolderDataset,
    LabeledImageFolder,
    LoadDrops,
    NoReadableImagesError,
    ReportsLoadDrops,
    SkipCounter,
    WebDatasetShards,
    _unpack_index,
    count_skipped_files,
    first_readable,
    open_image,
    to_rgb,
)
from .gpu_augment import to_device_async
from .seeding import generator_for, stable_index

__all__ = [
    "BatchDecoder",
    "DEVICE_SETTINGS",
    "EncodedBatch",
    "EncodedImageFiles",
    "EncodedSample",
    "EncodedWebDataset",
    "FinetunePipeline",
    "JPEG_DECODERS",
    "InMemoryIndices",
    "PretrainPipeline",
    "apply_exif_orientation",
    "collate_encoded",
    "probe",
    "use_device_path",
]

logger = logging.getLogger(__name__)

DEVICE_SETTINGS = ("auto", "cpu", "gpu", "batched")  # the values of data.device (use_device_path)
JPEG_DECODERS = ("workers", "device")  # where a JPEG the GPU decoder takes is decoded (module docstring)

_EXIF_ORIENTATION = 0x0112


def probe(data: bytes) -> tuple[str | None, tuple[int, int], int]:
    """Read an image header: ``(reason, (height, width), orientation)``.

    ``reason`` is None when the GPU decoder takes the file (baseline/extended 8-bit 3-channel JPEG),
    else why not (``"png"``, ``"progressive"``, ``"mode CMYK"``, ...). The size is the stored one (before
    EXIF orientation). Raises whatever PIL raises on a file that is not an image.
    """
    img = open_image(io.BytesIO(data))
    orientation = 1
    try:
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
        orientation = 1
    w, h = img.size
    fmt = (img.format or "?").lower()
    if fmt != "jpeg":
        return fmt, (h, w), orientation
    if img.mode != "RGB":
        return f"mode {img.mode}", (h, w), orientation
    if img.info.get("progressive") or img.info.get("progression"):
        return "progressive", (h, w), orientation
    bits = getattr(img, "bits", 8)
    if bits != 8:
        return f"{bits}-bit", (h, w), orientation
    return None, (h, w), orientation


def apply_exif_orientation(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """``[C, H, W]`` as PIL's ``ImageOps.exif_transpose`` would show it (orientation 1..8)."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1).flip(-2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return img.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return img.transpose(-1, -2).flip(-2)
    return img


def _pil_decode(data: bytes) -> torch.Tensor:
    """CPU decode (the CPU path's ``to_rgb``) with EXIF orientation -> uint8 ``[3, H, W]`` (a view of
    height x width x channel memory: no transposing copy)."""
    img = open_image(io.BytesIO(data))
    img.load()
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
        pass
    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _worker_decode(data: bytes, orientation: int) -> torch.Tensor:
    """A JPEG the GPU decoder would take, decoded on CPU with libjpeg-turbo (EXIF orientation applied) ->
    uint8 ``[3, H, W]``; a body libjpeg-turbo rejects goes to PIL, which decodes it or raises.

    The result is a view (libjpeg-turbo writes height x width x channel): ``collate_encoded`` copies it once,
    into the batch's buffer. (A ``.contiguous()`` here was a second, transposing copy: 0.87 ms a 500x375 photo
    on one core against the 0.69 ms decode, ``benchmarks/cpu_costs.py``.)"""
    try:
        img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return _pil_decode(data)
    return apply_exif_orientation(img, orientation)


def _encode_or_decode(data: bytes, sample: EncodedSample, jpeg_decode: str) -> EncodedSample:
    """Fill ``sample`` with the raw bytes (for the GPU decoder) or the decoded image, per ``jpeg_decode``."""
    if sample.reason is not None:
        sample.image = _pil_decode(data)
    elif jpeg_decode == "workers":
        sample.image = _worker_decode(data, sample.orientation)
    else:
        sample.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return sample


def _check_jpeg_decode(jpeg_decode: str) -> str:
    if jpeg_decode not in JPEG_DECODERS:
        raise ValueError(f"jpeg_decode must be one of {' | '.join(JPEG_DECODERS)}, got {jpeg_decode!r}")
    return jpeg_decode


@dataclass
class EncodedSample:
    """One file as the worker hands it on: raw JPEG ``data`` for the GPU, or ``image`` decoded on CPU
    (``reason`` says why when it was not meant for the GPU; None with an ``image``: decoded by the worker)."""

    index: int
    epoch: int
    name: str
    data: torch.Tensor | None = None  # uint8 [n] encoded bytes (GPU decode)
    image: torch.Tensor | None = None  # uint8 [3, H, W] (CPU fallback, orientation applied)
    orientation: int = 1
    cropped: bool = False  # ``image`` is already the sample's random-resized-crop box (see EncodedImageFiles)
    reason: str | None = None  # why the file fell back to CPU
    mask: torch.Tensor | None = None
    label: int = -1
    skipped: list[str] = field(default_factory=list)  # unreadable files replaced by this one


@dataclass
class EncodedBatch:
    """A batch of ``EncodedSample``; ``pin_memory`` keeps it whole (the engine moves no part of it)."""

    index: torch.Tensor  # int64 [B]
    epoch: int
    names: list[str]
    blob: torch.Tensor  # uint8: the raw bytes of every GPU-decodable file, back to back (one shared buffer
    # per batch, not one per file, so a worker never hands over hundreds of file descriptors)
    spans: list[tuple[int, int] | None]  # each sample's (start, end) in ``blob``; None = decoded on CPU
    pixels: torch.Tensor  # uint8: the CPU-decoded images, each H x W x 3, back to back (one buffer, one copy)
    shapes: list[tuple[int, int, int] | None]  # each CPU-decoded sample's (offset in ``pixels``, H, W), else None
    orientation: list[int]
    reasons: list[str | None]
    masks: torch.Tensor | None
    labels: torch.Tensor | None
    skipped: list[str]
    cropped: torch.Tensor | None = None  # bool [B]: the sample's image is already its crop box (None: none is)
    in_worker: bool = False  # made in a DataLoader worker process (False: in this process, e.g. num_workers=0)

    def __len__(self) -> int:
        return len(self.names)

    def data(self, i: int) -> torch.Tensor | None:
        """Sample ``i``'s encoded bytes (a view of ``blob``), or None when it was decoded on CPU."""
        span = self.spans[i]
        return None if span is None else self.blob[span[0] : span[1]]

    def pin_memory(self) -> EncodedBatch:
        """Pin what moves to the GPU (pixels, masks, labels, indices) so the moves are asynchronous; the
        encoded bytes stay (the decoder reads them on the host)."""
        self.pixels = self.pixels.pin_memory()
        self.index = self.index.pin_memory()
        if self.masks is not None:
            self.masks = self.masks.pin_memory()
        if self.labels is not None:
            self.labels = self.labels.pin_memory()
        return self


def collate_encoded(samples: Sequence[EncodedSample | tuple[EncodedSample, int]]) -> EncodedBatch:
    """Stack ``EncodedSample``s (or ``(sample, label)`` pairs) into an ``EncodedBatch`` (masks and labels
    stacked, the rest as lists; ``in_worker`` when this runs in a DataLoader worker, where its samples were read).

    Raises:
        ValueError: no samples.
    """
    if not samples:
        raise ValueError("collate_encoded got an empty batch")
    samples = [s[0] if isinstance(s, tuple) else s for s in samples]  # (sample, label) from labeled streams
    masks = torch.stack([s.mask for s in samples]) if samples[0].mask is not None else None
    labels = torch.tensor([s.label for s in samples], dtype=torch.long) if samples[0].label >= 0 else None
    spans: list[tuple[int, int] | None] = []
    shapes: list[tuple[int, int, int] | None] = []
    chunks: list[torch.Tensor] = []
    pos = off = 0
    for s in samples:
        if s.data is None:
            spans.append(None)
        else:
            spans.append((pos, pos + len(s.data)))
            chunks.append(s.data)
            pos += len(s.data)
        if s.image is None:
            shapes.append(None)
        else:
            shapes.append((off, int(s.image.shape[-2]), int(s.image.shape[-1])))
            off += s.image.numel()
    blob = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    pixels = _batch_buffer(off)
    for s, shape in zip(samples, shapes):  # one copy of each image, H x W x 3 (how the decoders write it)
        if shape is not None:
            o, h, w = shape
            pixels[o : o + 3 * h * w].view(h, w, 3).copy_(s.image.permute(1, 2, 0))  # type: ignore[union-attr]
    cropped = torch.tensor([s.cropped for s in samples]) if any(s.cropped for s in samples) else None
    return EncodedBatch(
        index=torch.tensor([s.index for s in samples], dtype=torch.long), epoch=samples[0].epoch,
        names=[s.name for s in samples], blob=blob, spans=spans, pixels=pixels, shapes=shapes,
        orientation=[s.orientation for s in samples], reasons=[s.reason for s in samples], masks=masks,
        labels=labels, skipped=[n for s in samples for n in s.skipped], cropped=cropped,
        in_worker=torch.utils.data.get_worker_info() is not None,
    )


def _batch_buffer(n: int) -> torch.Tensor:
    """An uninitialised uint8 ``[n]``; in a DataLoader worker, in shared memory from the start (as torch's
    ``default_collate`` makes its outputs), so handing the batch to the training process copies nothing more."""
    if n and torch.utils.data.get_worker_info() is not None:
        try:
            return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n)).view(n)
        except Exception:  # noqa: BLE001 - a private API: without it the batch is only copied once more
            pass
    return torch.empty(n, dtype=torch.uint8)


class EncodedImageFiles(torch.utils.data.Dataset):
    """Image files as ``EncodedSample``s for the batched decoder (see the module docstring).

    Args:
        samples: ``(path, label)`` pairs (label -1 = unlabeled), e.g. ``ImageFolderDataset(root).samples``.
        mask_generator: draws a bool ``[h, w]`` mask per sample from the ``torch.Generator`` it is given, seeded
            from ``(seed, epoch, index)`` (a ``BlockwiseMaskGenerator``: the same masks as the CPU path, which
            draws inside ``seeded(seed, epoch, index)``, without saving and restoring three global RNGs).
        seed: the run's seed.
        jpeg_decode: ``"workers"`` (decode JPEGs here, in the loader's workers) or ``"device"`` (hand their
            bytes to ``BatchDecoder``); see the module docstring.
        crop: ``(index, epoch, height, width) -> (top, left, h, w)``, the views' own crop box
            (``PretrainViews.worker_crop()``, ``FinetuneAugment.worker_crop()``): an image decoded here is cut
            to it before it travels (``EncodedSample.cropped``), so the batch carries crops, not photos; the
            views then take it whole. None: whole images.

    Raises:
        ValueError: no samples, or an unknown ``jpeg_decode``.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], *, mask_generator: Callable[..., torch.Tensor] | None = None,
                 seed: int = 0, jpeg_decode: str = "workers",
                 crop: Callable[[int, int, int, int], tuple[int, int, int, int]] | None = None) -> None:
        if not samples:
            raise ValueError("EncodedImageFiles needs at least one file")
        self.jpeg_decode = _check_jpeg_decode(jpeg_decode)
        self.samples = list(samples)
        self.mask_generator = mask_generator
        self.crop = crop
        self.seed = int(seed)
        self.epoch = 0
        self._bad: dict[int, str] = {}  # index -> error, found in this process
        # found unreadable in any process (shared with the DataLoader's workers, as the CPU datasets do): a bad
        # file is read, warned about and named once, not once per worker
        self._bad_mask = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()
        self.skip_counter = SkipCounter()  # skipped files per epoch, over workers (and the batch decoder)
        self._skip_seen = torch.full((len(self.samples),), -1, dtype=torch.int64).share_memory_()

    @classmethod
    def from_folder(cls, root: str | os.PathLike, *, labeled: bool = False, class_names: Sequence[str] | None = None,
                    **kwargs: Any) -> EncodedImageFiles:
        """All images under ``root`` (``labeled``: ``root/<class>/...`` as ``LabeledImageFolder``)."""
        ds = LabeledImageFolder(root, class_names=class_names) if labeled else ImageFolderDataset(root)
        out = cls(ds.samples, **kwargs)
        out.classes = list(getattr(ds, "classes", []))  # type: ignore[attr-defined]
        return out

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (call before creating the DataLoader iterator: persistent
        workers keep the copy they were started with; or index with ``(epoch, index)`` pairs, as the engine
        does through ``EpochIndexed``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def spare_image(self) -> torch.Tensor:
        """The first file that decodes on CPU (PIL, EXIF applied), uint8 ``[3, H, W]``: the GPU decoder's stand-in
        for a batch none of whose files it can decode.

        Raises:
            NoReadableImagesError: no file decodes.
        """
        for path, _ in self.samples:
            try:
                with open(path, "rb") as f:
                    return _pil_decode(f.read())
            except Exception:  # noqa: BLE001, S112 - any reader error: try the next file
                continue
        raise NoReadableImagesError(f"none of the {len(self.samples)} images could be read")

    def skipped_count(self, epoch: int | None = None) -> int:
        """Samples replaced so far because their file could not be read (in the workers, and in the GPU
        decoder when the pipeline was given ``skips=dataset.skip_counter``), over all processes; those of
        ``epoch`` only when given. The engine logs it per epoch as ``skipped_files``."""
        return self.skip_counter.total(epoch)

    @property
    def bad_paths(self) -> list[str]:
        """Files found unreadable in this process."""
        return [self.samples[i][0] for i in sorted(self._bad)]

    def _read(self, i: int) -> EncodedSample:
        path, label = self.samples[i]
        with open(path, "rb") as f:
            data = f.read()
        reason, _, orientation = probe(data)
        s = EncodedSample(index=i, epoch=self.epoch, name=path, orientation=orientation, reason=reason, label=label)
        return _encode_or_decode(data, s, self.jpeg_decode)

    def __getitem__(self, index: int | tuple[int, int]) -> EncodedSample:
        epoch, index = _unpack_index(index, self.epoch, len(self))
        skipped: list[str] = []

        def mark_bad(i: int, err: BaseException) -> None:
            self._bad_mask[i] = True
            self._bad[i] = f"{type(err).__name__}: {err}"
            skipped.append(self.samples[i][0])
            logger.warning("skipping unreadable image %s (%s); a replacement sample is used",
                           self.samples[i][0], self._bad[i])

        i, sample = first_readable(len(self.samples), index, lambda j: bool(self._bad_mask[j]), self._read, mark_bad,
                                   lambda: self.bad_paths[:5])
        sample.index, sample.epoch, sample.skipped = index, epoch, skipped
        if i != index:  # replaced: each file passed over counted once an epoch (as the CPU path counts)
            count_skipped_files(self._skip_seen, len(self.samples), index, i, epoch, self.skip_counter)
        if self.crop is not None and sample.image is not None:  # the requested index's box, as the views draw it
            top, left, h, w = self.crop(index, epoch, int(sample.image.shape[-2]), int(sample.image.shape[-1]))
            sample.image, sample.cropped = sample.image[:, top : top + h, left : left + w], True
        if self.mask_generator is not None:
            sample.mask = self.mask_generator(generator_for(self.seed, epoch, index))
        return sample


class EncodedWebDataset(WebDatasetShards):
    """``WebDatasetShards`` for the batched decoder: yields ``EncodedSample``s (bytes or CPU-decoded image,
    mask drawn inside ``seeded(seed, epoch, stable_index(__key__))``, label when ``label_key`` is set).

    Same shard order, rank/worker split and resume as ``WebDatasetShards``; unreadable samples are skipped and
    named in the next sample's ``skipped`` list, so the main process counts them.
    """

    def __init__(self, urls: str | Sequence[str], *, mask_generator: Callable[..., torch.Tensor] | None = None,
                 jpeg_decode: str = "workers", **kwargs: Any) -> None:
        super().__init__(urls, transform=self._draw_mask, **kwargs)
        self.jpeg_decode = _check_jpeg_decode(jpeg_decode)
        self.mask_generator = mask_generator
        self._pending_skips: list[str] = []

    def _draw_mask(self, sample: EncodedSample) -> EncodedSample:  # runs inside seeded(seed, epoch, key)
        if self.mask_generator is not None:
            sample.mask = self.mask_generator()
        sample.skipped, self._pending_skips = self._pending_skips, []
        return sample

    def _skip(self, key: str, why: str) -> None:
        super()._skip(key, why)
        self._pending_skips.append(key)

    def _decode(self, sample: dict[str, Any]) -> tuple[EncodedSample, int] | None:
        fields = self._fields(sample)
        if fields is None:
            return None
        key, data, target = fields
        try:
            reason, _, orientation = probe(data)
            out = EncodedSample(index=stable_index(str(sample.get("__key__", ""))), epoch=self.epoch, name=key,
                                orientation=orientation, reason=reason, label=target)
            _encode_or_decode(data, out, self.jpeg_decode)
        except Exception as err:  # noqa: BLE001
            self._skip(key, f"{type(err).__name__}: {err}")
            return None
        return out, target


class BatchDecoder:
    """Decode an ``EncodedBatch`` on ``device``: one batched nvJPEG call, per-file fallbacks, counters.

    Counters (cumulative): ``num_gpu`` decoded by ``decode_jpeg`` on the device, ``num_workers`` JPEGs
    decoded by the loader's worker processes (``jpeg_decode="workers"``), ``num_in_process`` those the loader
    decoded in this process instead (DataLoader ``num_workers=0``), ``fallback`` (reason -> count) files the GPU
    decoder does not take, decoded on CPU (in the workers, or here after a device failure), ``skipped_names``
    files that no decoder could read (their slots hold a copy of another sample of the batch, its image with its
    index, mask and label; or, when no file of the batch decodes, an image kept from an earlier batch, else
    ``spare_source()``, and then each sample keeps its own label: one noisy label per such file and epoch). Such a
    file counts in ``skips`` once an epoch, however many of the epoch's batches carry it.
    """

    def __init__(self, device: torch.device | str, skips: SkipCounter | None = None,
                 spare_source: Callable[[], torch.Tensor] | None = None) -> None:
        self.device = torch.device(device)
        self.skips = skips  # the dataset's counter: files that fail here count as its skips too
        self.spare_source = spare_source  # a readable image (CPU uint8 [3, H, W]) before any batch decoded
        self.num_gpu = 0  # decoded by nvJPEG on a CUDA device
        self.num_main_cpu = 0  # decoded by torchvision in the main process, on a device without CUDA
        self._warned_cpu = False
        self.num_workers = 0  # JPEGs decoded by the loader in its worker processes
        self.num_in_process = 0  # ... by the loader in this process (DataLoader num_workers=0)
        self._spare: torch.Tensor | None = None  # a decoded image kept to fill a batch none of whose files decode
        self.fallback: Counter[str] = Counter()
        self._skipped: dict[str, None] = {}  # insertion-ordered set
        # file -> the last epoch its failure here was counted in ``skips`` (as ``count_skipped_files``' ``seen``): a
        # file met twice in an epoch (as itself and as the replacement of an unreadable one) counts once
        self._counted_in: dict[str, int] = {}

    @property
    def skipped_names(self) -> list[str]:
        """Distinct files no decoder could read, in the order they were met."""
        return list(self._skipped)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_names)

    def _decode_jpegs(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if self.device.type == "cuda":
            # nvJPEG writes its outputs (fresh blocks of the caching allocator, which may have been freed on
            # this stream while queued kernels still read them) from a stream that does not wait for this
            # one (pytorch/vision PR 9606, torchcodec PR 1634): let the queued work finish first. Under the
            # engine this is the prefetch side stream, idle by then, so the wait is short.
            torch.cuda.current_stream(self.device).synchronize()
        try:
            out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)
            return list(out)
        except RuntimeError:
            pass
        res: list[torch.Tensor | None] = []
        for d in datas:  # find the culprit(s): one by one
            try:
                res.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                res.append(None)
        return res

    def __call__(self, batch: EncodedBatch) -> tuple[list[torch.Tensor], EncodedBatch]:
        """Images (uint8 ``[3, H, W]`` on the device, EXIF orientation applied) and the batch, whose
        ``index``/``masks``/``labels`` rows of skipped files are replaced by those of the copied image."""
        B = len(batch)
        self.fallback.update(r for r in batch.reasons if r is not None)
        loader_decoded = sum(1 for i in range(B) if batch.reasons[i] is None and batch.shapes[i] is not None)
        if batch.in_worker:
            self.num_workers += loader_decoded
        else:
            self.num_in_process += loader_decoded
        self._skipped.update(dict.fromkeys(batch.skipped))
        images: list[torch.Tensor | None] = [None] * B
        gpu_pos = [i for i in range(B) if batch.spans[i] is not None]
        if gpu_pos and self.device.type != "cuda" and not self._warned_cpu:
            self._warned_cpu = True
            logger.warning("data.jpeg_decode=device without CUDA: the JPEGs are decoded on the %s, in the main "
                           "process (data.jpeg_decode=workers decodes them in the loader workers)", self.device,
                           extra=ALIKE_ON_EVERY_RANK)
        if gpu_pos:
            decoded = self._decode_jpegs([batch.data(i) for i in gpu_pos])  # type: ignore[misc]
            for i, img in zip(gpu_pos, decoded):
                if img is None:
                    try:  # PIL applies the EXIF orientation itself
                        images[i] = _pil_decode(batch.data(i).numpy().tobytes())  # type: ignore[union-attr]
                        self.fallback["gpu decoder failed"] += 1
                    except Exception as err:  # noqa: BLE001
                        self._skipped[batch.names[i]] = None
                        if self.skips is not None and self._counted_in.get(batch.names[i]) != batch.epoch:
                            self._counted_in[batch.names[i]] = batch.epoch
                            self.skips.add(epoch=batch.epoch)
                        logger.warning("skipping unreadable image %s (%s: %s)", batch.names[i], type(err).__name__, err)
                    continue
                if self.device.type == "cuda":
                    self.num_gpu += 1
                else:
                    self.num_main_cpu += 1
                images[i] = apply_exif_orientation(img, batch.orientation[i])
        pixels = to_device_async(batch.pixels, self.device) if batch.pixels.numel() else None  # one copy
        for i in range(B):
            shape = batch.shapes[i]
            if shape is not None:
                off, h, w = shape
                images[i] = pixels[off : off + 3 * h * w].view(h, w, 3).permute(2, 0, 1)  # type: ignore[index]
            elif images[i] is not None and images[i].device != self.device:  # type: ignore[union-attr]
                images[i] = images[i].to(self.device, non_blocking=True)  # type: ignore[union-attr]
        good = [i for i in range(B) if images[i] is not None]
        if not good:  # every file of the batch failed in the GPU decoder (e.g. batch size 1): a spare image
            if self._spare is None:
                spare = self.spare_source() if self.spare_source is not None else None
                # last resort (a stream without random access): a mid-grey image, counted and named as above
                self._spare = (spare if spare is not None else torch.full((3, 64, 64), 128, dtype=torch.uint8)
                               ).to(self.device)
            images = [self._spare] * B
            return images, batch  # type: ignore[return-value]
        if self._spare is None:
            self._spare = images[good[0]].clone()  # type: ignore[union-attr]
        if len(good) < B:
            src = torch.tensor([i if images[i] is not None else good[k % len(good)] for k, i in enumerate(range(B))])
            for i in range(B):
                images[i] = images[int(src[i])]
            batch = EncodedBatch(
                index=batch.index[src], epoch=batch.epoch, names=[batch.names[int(j)] for j in src], blob=batch.blob,
                spans=batch.spans, pixels=batch.pixels, shapes=batch.shapes, orientation=batch.orientation,
                reasons=batch.reasons,
                masks=batch.masks[src] if batch.masks is not None else None,
                labels=batch.labels[src] if batch.labels is not None else None, skipped=batch.skipped,
                cropped=batch.cropped[src] if batch.cropped is not None else None, in_worker=batch.in_worker,
            )
        return images, batch  # type: ignore[return-value]

    @property
    def idle(self) -> bool:
        """Nothing decoded, fell back or skipped here: the in-memory path (every image decoded once at start, its
        unreadable files already named then), whose all-zero :meth:`summary` is not worth a log line."""
        return not (self.num_gpu or self.num_main_cpu or self.num_workers or self.num_in_process or self.fallback
                    or self._skipped)

    def summary(self) -> dict[str, Any]:
        """Counters as a dict: gpu (nvJPEG on CUDA), main_cpu (the same batched decode run on a device without
        CUDA; only there), workers (JPEGs the loader's worker processes decoded), in_process (those the loader
        decoded in this process, with no workers; only then), fallback per reason, skipped and their names."""
        out = {"gpu": self.num_gpu, **({"main_cpu": self.num_main_cpu} if self.num_main_cpu else {}),
               "workers": self.num_workers, **({"in_process": self.num_in_process} if self.num_in_process else {})}
        return {**out, "fallback": dict(self.fallback),
                "skipped": self.num_skipped,
                "skipped_names": list(self.skipped_names)}


# ------------------------------------------------------------------------------------------ in memory
@dataclass
class IndexBatch:
    """Indices (and masks, labels) of a batch of in-memory images."""

    index: torch.Tensor
    epoch: int
    masks: torch.Tensor | None

    def pin_memory(self) -> IndexBatch:
        self.index = self.index.pin_memory()
        if self.masks is not None:
            self.masks = self.masks.pin_memory()
        return self


class InMemoryIndices(ReportsLoadDrops, torch.utils.data.Dataset):
    """The loader's side of the in-memory path: only indices (and masks drawn in the workers).

    The images themselves live on the device (``uint8 [N, 3, H, W]``) in the pipeline, which gathers a
    batch with one index lookup. ``dropped``: the files left out when the folder was decoded
    (:func:`beit.data.datasets.decode_image_folder`), counted as skipped samples of the first epoch.
    """

    def __init__(self, n: int, *, mask_generator: Callable[..., torch.Tensor] | None = None, seed: int = 0,
                 dropped: Sequence[str] = ()) -> None:
        self.n = int(n)
        self.mask_generator = mask_generator
        self.seed = int(seed)
        self.epoch = 0
        self.drops = LoadDrops(dropped)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch``."""
        self.epoch = int(epoch)
        self.drops.set_epoch(epoch)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[int, int, torch.Tensor | None]:
        epoch, index = _unpack_index(index, self.epoch, self.n)
        mask = None
        if self.mask_generator is not None:
            mask = self.mask_generator(generator_for(self.seed, epoch, index))
        return index, epoch, mask

    @staticmethod
    def collate(samples: Sequence[tuple[int, int, torch.Tensor | None]]) -> IndexBatch:
        masks = torch.stack([s[2] for s in samples]) if samples[0][2] is not None else None  # type: ignore[misc]
        return IndexBatch(torch.tensor([s[0] for s in samples], dtype=torch.long), int(samples[0][1]), masks)


def use_device_path(setting: str, device: torch.device | str) -> bool:
    """``data.device``: ``cpu`` = the PIL path in the workers; ``gpu`` = this batched path on the training
    device (on a machine without CUDA the same code runs on CPU tensors, with a warning); ``batched`` = this
    path on whatever the training device is, without the warning (on CPU it augments a whole batch in the
    training process: about twice the img/s of the per-sample PIL path for small images and few cores, which is
    what ``beit demo`` uses); ``auto`` = ``gpu`` when the training device is CUDA, else ``cpu``.

    Raises:
        ValueError: any other value.
    """
    if setting not in DEVICE_SETTINGS:
        raise ValueError(f"must be {' | '.join(DEVICE_SETTINGS)}, got {setting!r}")
    device = torch.device(device)
    if setting == "gpu" and device.type != "cuda":
        logger.warning("data.device=gpu without CUDA: the batched tensor path runs on %s (data.device=batched "
                       "asks for that without this warning)", device, extra=ALIKE_ON_EVERY_RANK)
    return setting in ("gpu", "batched") or (setting == "auto" and device.type == "cuda")


def _device_images(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` or ``[N, 3, H, W]`` -> ``[N, 3, H, W]`` on ``device``."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"in-memory images must be uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    return images.contiguous().to(device)


# ------------------------------------------------------------------------------------------ pipelines
class PretrainPipeline:
    """``EncodedBatch`` or ``IndexBatch`` -> the pre-training batch ``{"image", "tok_image", "mask"}``.

    Args:
        views: a ``beit.data.gpu_augment.PretrainViews``.
        device: where decoding and augmentation run.
        images: for the in-memory path, all images (uint8 ``[N, H, W, 3]``), moved to ``device`` once.
        skips: the dataset's ``skip_counter``, to count the files the GPU decoder fails on as its skips.
        spare_source: e.g. the dataset's ``spare_image``, for a first batch none of whose files decode.
        dropped: for the in-memory path, the files left out when the folder was decoded: the decoder's summary
            names them as its skipped files (as the run's ``skipped_files`` counts them).
    """

    def __init__(self, views: Any, device: torch.device | str, images: torch.Tensor | None = None,
                 skips: SkipCounter | None = None,
                 spare_source: Callable[[], torch.Tensor] | None = None, dropped: Sequence[str] = ()) -> None:
        self.views = views
        self.device = torch.device(device)
        self.decoder = BatchDecoder(self.device, skips, spare_source)
        self.decoder._skipped.update(dict.fromkeys(dropped))
        self.images = _device_images(images, self.device) if images is not None else None

    @torch.no_grad()
    def __call__(self, batch: EncodedBatch | IndexBatch) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device.type, enabled=False):
            if isinstance(batch, IndexBatch):
                if self.images is None:
                    raise ValueError("PretrainPipeline got an IndexBatch but holds no in-memory images")
                imgs: Any = self.images[to_device_async(batch.index, self.device)]
                return self.views(imgs, batch.index, batch.epoch, batch.masks)
            imgs, batch = self.decoder(batch)
            return self.views(imgs, batch.index, batch.epoch, batch.masks, cropped=batch.cropped)


class FinetunePipeline:
    """``EncodedBatch`` (labeled) or ``IndexBatch`` -> ``(images [B, 3, S, S], labels [B])`` on the device.

    Args:
        augment: a ``beit.data.gpu_augment.FinetuneAugment``.
        device: where decoding and augmentation run.
        images, labels: for the in-memory path, all images (uint8 ``[N, H, W, 3]``) and labels ``[N]``.
        skips: the dataset's ``skip_counter``, to count the files the GPU decoder fails on as its skips.
        spare_source: e.g. the dataset's ``spare_image``, for a first batch none of whose files decode.
        dropped: for the in-memory path, the files left out when the folder was decoded: the decoder's summary
            names them as its skipped files (as the run's ``skipped_files`` counts them).
    """

    def __init__(self, augment: Any, device: torch.device | str, images: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, skips: SkipCounter | None = None,
                 spare_source: Callable[[], torch.Tensor] | None = None, dropped: Sequence[str] = ()) -> None:
        self.augment = augment
        self.device = torch.device(device)
        self.decoder = BatchDecoder(self.device, skips, spare_source)
        self.decoder._skipped.update(dict.fromkeys(dropped))
        self.images = _device_images(images, self.device) if images is not None else None
        self.labels = labels.to(self.device) if labels is not None else None  # once, at set-up

    @torch.no_grad()
    def __call__(self, batch: EncodedBatch | IndexBatch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, enabled=False):
            if isinstance(batch, IndexBatch):
                if self.images is None or self.labels is None:
                    raise ValueError("FinetunePipeline got an IndexBatch but holds no in-memory images/labels")
                idx = to_device_async(batch.index, self.device)
                return self.augment(self.images[idx], batch.index, batch.epoch), self.labels[idx]
            imgs, batch = self.decoder(batch)
            if batch.labels is None:
                raise ValueError("FinetunePipeline needs labeled files (root/<class>/<image>)")
            return (self.augment(imgs, batch.index, batch.epoch, cropped=batch.cropped),
                    to_device_async(batch.labels, self.device))
