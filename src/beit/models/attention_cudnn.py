"""BEiT's biased attention on cuDNN's fused attention kernels, the bias gradient summed over the batch by cuDNN.

    out = softmax(q @ k^T / sqrt(d) + bias) @ v,   bias: [H, L, L], the same for every image of the batch

cuDNN's scaled-dot-product-attention graph (FlashAttention-2's algorithm; the library whose kernels SDPA ran for
BEiT's attention without a bias on an H100, RESULTS.md section 6) takes an additive bias, and its backward returns
``dBias`` for a bias broadcast over the batch, ``[1, H, L, L]``: the sum over images happens inside cuDNN
(atomically, so its last bits may vary from run to run), with no ``[B, H, L, L]`` tensor. PyTorch's own cuDNN
attention takes a bias but returns no gradient for it, so SDPA never picks it for a learned bias; this module
reaches cuDNN through NVIDIA's ``cudnn`` Python package (``pip install nvidia-cudnn-frontend``, the extra
``beit[cudnn]``), which builds the graphs.

- Layouts as the Triton kernel's (``attention_triton``): q, k, v are read in place from the qkv projection's
  ``[B, L, 3, H, d]`` output (cuDNN's "bs3hd" layout), the output is written ``[B, L, H, d]``, and the gradients
  come back as one ``[B, L, 3, H, d]`` tensor.
- One forward and one backward graph per (shape, strides, dtype, device), built on first use and kept; fp16 / bf16
  inputs (the bias is cast to their dtype, as the ``sdpa`` path does), fp32 softmax statistics and accumulation;
  ``d(bias)`` is asked of cuDNN in fp32, else in the inputs' dtype where the installed cuDNN takes only that.
- Wrapped as the custom ops ``beit::cudnn_bias_attention_fwd`` / ``_bwd`` (opaque nodes for ``torch.compile``)
  with the autograd formula registered. :func:`supported_packed` says which inputs go here;
  ``beit.models.attention`` sends the rest to the Triton kernel, then SDPA. A graph cuDNN refuses (a GPU older than
  Ampere, a shape its kernels do not take, the deterministic backward with a bias shared by the batch) is warned
  about once and runs the Triton kernel instead (its log-sum-exp is cuDNN's statistics: natural log of the scaled
  scores plus the bias, so either backward follows either forward); a shape neither takes is an error naming both.

Source: NVIDIA cuDNN frontend, "Attention" operation docs (``sdpa`` / ``sdpa_backward`` with ``bias`` and
``dBias``). ``benchmarks/attention_kernel.py`` checks it on a GPU; RESULTS.md section 6 says what is measured.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from . import attention_triton as _triton

__all__ = ["HAS_CUDNN_FRONTEND", "cudnn_bias_attention_packed", "refusal", "supported_packed"]

#: whether NVIDIA's ``cudnn`` Python package (nvidia-cudnn-frontend) is installed (imported on first use)
HAS_CUDNN_FRONTEND = importlib.util.find_spec("cudnn") is not None

_DTYPES = (torch.float16, torch.bfloat16)
_LOCK = threading.Lock()
# a device's one cudnn handle carries the stream it runs on: setting that stream and launching on it are one step,
# so that a call from another thread (another stream) cannot set its stream between the two
_RUN_LOCK = threading.Lock()
_HANDLE_LOCK = threading.Lock()
_PLANS: dict[tuple, _Plan | Exception] = {}  # graph key -> built plan, or why cuDNN refused it
_HANDLES: dict[int, Any] = {}  # CUDA device index -> cudnn handle
_EXIT_LOCK_WAIT_S = 2.0  # how long the exit hook waits for a plan being built elsewhere


@atexit.register
def _drop_plans() -> None:
    """Free the cached graphs before the interpreter's teardown, where the frontend's bindings (nanobind) report
    each graph still alive as a leak: ~50 lines of "nanobind: leaked ..." at the end of every process that ran
    this op (seen on an H100, 2026-12-06, benchmarks/RESULTS.md section 6). Waits a moment at most for
    ``_LOCK``: a daemon thread still building a plan, or a forked child whose fork copied the lock held by a
    thread it does not have, would otherwise hang the exit (then the graphs are left to the teardown)."""
    if not _LOCK.acquire(timeout=_EXIT_LOCK_WAIT_S):
        return
    try:
        _PLANS.clear()
    finally:
        _LOCK.release()


def _cudnn() -> Any:
    import cudnn  # noqa: PLC0415 - optional dependency, imported where first needed

    return cudnn


def refusal(qkv: torch.Tensor, bias: torch.Tensor | None, dropout_p: float = 0.0) -> str | None:
    """Why :func:`cudnn_bias_attention_packed` does not take these inputs, or None when it does.

    Needs the ``cudnn`` package, ``qkv`` ``[B, L, 3, H, d]`` in fp16 / bf16 with ``d`` a multiple of 8 up to 128
    and a unit stride in ``d``, no dropout, a bias broadcast over the batch (``[H, L, L]`` or ``[1, H, L, L]``) and
    CUDA tensors (checked last, so that the other reasons can be checked on any machine). What cuDNN itself refuses
    (a GPU older than Ampere, a shape its kernels do not take) is found when the graph is built, and runs the Triton
    kernel instead (checks here stay traceable by ``torch.compile``).
    """
    if not HAS_CUDNN_FRONTEND:
        return "the cudnn package (pip install nvidia-cudnn-frontend) is not installed"
    if dropout_p != 0.0:
        return f"attention dropout {dropout_p} (cuDNN's bias-gradient graph is built without dropout)"
    if bias is None:
        return "no bias (use sdpa)"
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        return "qkv is not [B, L, 3, H, d]"
    if qkv.dtype not in _DTYPES:
        return f"{qkv.dtype} (cuDNN takes float16 or bfloat16)"
    if qkv.stride(-1) != 1:
        return "qkv has no unit stride in d"
    _, L, _, H, d = qkv.shape
    if not (d % 8 == 0 and 8 <= d <= 128):
        return f"head dim {d} (a multiple of 8 up to 128)"
    if tuple(bias.shape) not in ((H, L, L), (1, H, L, L)):
        return f"bias {tuple(bias.shape)} (one for the batch: [H, L, L] or [1, H, L, L] = {(1, H, L, L)})"
    if not qkv.is_cuda:
        return f"{qkv.device} tensors (CUDA only)"
    return None


def supported_packed(qkv: torch.Tensor, bias: torch.Tensor | None, dropout_p: float = 0.0) -> bool:
    """True when :func:`cudnn_bias_attention_packed` takes these inputs (else use another path); see :func:`refusal`."""
    return refusal(qkv, bias, dropout_p) is None


@dataclass
class _Plan:
    graph: Any
    ports: tuple  # the graph's tensors, in the order :meth:`run` binds its arguments
    workspace: int  # bytes
    dbias_dtype: torch.dtype | None = None  # the backward's d(bias) dtype
    bias_padded: bool = False  # bias (and d(bias)) rows padded to 16 bytes (see :func:`_bias_buffer`)

    def run(self, device: torch.device, *tensors: torch.Tensor) -> None:
        handle = _handle(device)
        ws = torch.empty(self.workspace, device=device, dtype=torch.uint8)
        with _RUN_LOCK:
            _cudnn().set_stream(handle=handle, stream=_stream(device))
            self.graph.execute(dict(zip(self.ports, tensors)), ws, handle=handle)


def _handle(device: torch.device) -> Any:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _HANDLES:
        with _HANDLE_LOCK, torch.cuda.device(index):
            if index not in _HANDLES:  # one handle a device, also when two threads get here first together
                _HANDLES[index] = _cudnn().create_handle()
    return _HANDLES[index]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _views(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as ``[B, H, L, d]`` views of ``[B, L, 3, H, d]`` (cuDNN's dims; the strides say the layout)."""
    return tuple(t.transpose(1, 2) for t in qkv.unbind(2))  # type: ignore[return-value]


def _key(kind: str, *tensors: torch.Tensor) -> tuple:
    return (kind, *((tuple(t.shape), t.stride(), t.dtype) for t in tensors), tensors[0].device)


def _cudnn_dtype(dtype: torch.dtype) -> Any:
    t = _cudnn().data_type
    return {torch.float16: t.HALF, torch.bfloat16: t.BFLOAT16, torch.float32: t.FLOAT}[dtype]


def _new_graph(dtype: torch.dtype, device: torch.device) -> Any:
    cudnn = _cudnn()
    return cudnn.pygraph(io_data_type=_cudnn_dtype(dtype), intermediate_data_type=cudnn.data_type.FLOAT,
                         compute_data_type=cudnn.data_type.FLOAT, handle=_handle(device))


def _finish(graph: Any) -> int:
    """Validate, choose and build the plan; its workspace size in bytes. Raises what cuDNN raises."""
    cudnn = _cudnn()
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return int(graph.get_workspace_size())


def _output(port: Any, like: torch.Tensor, fp32: bool = False) -> None:
    port.set_output(True).set_dim(list(like.shape)).set_stride(list(like.stride()))
    if fp32:
        port.set_data_type(_cudnn().data_type.FLOAT)


def _bias_stride(H: int, L: int, padded: bool) -> list[int]:
    row = -(-L // 8) * 8 if padded else L
    return [H * L * row, L * row, row, 1]


def _bias_buffer(H: int, L: int, dtype: torch.dtype, device: torch.device, padded: bool) -> torch.Tensor:
    """An uninitialised ``[1, H, L, L]`` tensor with :func:`_bias_stride`'s strides: contiguous, or (``padded``) each
    row starting at a multiple of 16 bytes (BEiT's lengths are odd: 197 bf16 values are 394 bytes), for a cuDNN that
    wants aligned rows."""
    row = _bias_stride(H, L, padded)[2]
    return torch.empty((1, H, L, row), dtype=dtype, device=device)[..., :L]


def _bias_port(g: Any, H: int, L: int, dtype: torch.dtype, padded: bool, name: str) -> Any:
    return g.tensor(name=name, dim=[1, H, L, L], stride=_bias_stride(H, L, padded), data_type=_cudnn_dtype(dtype))


def _build_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, out: torch.Tensor,
               stats: torch.Tensor) -> _Plan:
    """The forward graph; bias rows contiguous, else padded (the first layout cuDNN takes)."""
    B, H, L, d = q.shape
    errors = []
    for padded in (False, True):
        g = _new_graph(q.dtype, q.device)
        ports = [*(g.tensor_like(t) for t in (q, k, v)), _bias_port(g, H, L, q.dtype, padded, "bias")]
        o, st = g.sdpa(name="sdpa", q=ports[0], k=ports[1], v=ports[2], bias=ports[3], generate_stats=True,
                       attn_scale=d ** -0.5)
        _output(o, out)
        _output(st, stats, fp32=True)
        try:
            return _Plan(g, (*ports, o, st), _finish(g), bias_padded=padded)
        except Exception as e:  # noqa: BLE001 - cuDNN's own error types differ between its versions
            errors.append(f"{'padded' if padded else 'contiguous'} bias rows: {type(e).__name__}: {e}")
    raise RuntimeError("; ".join(errors))


def _build_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
               stats: torch.Tensor, bias: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
               deterministic: bool = False) -> _Plan:
    """The backward graph; the first of: bias rows contiguous, else padded, each with d(bias) in fp32 (the batch sum
    in fp32), else in the inputs' dtype, that cuDNN takes."""
    B, H, L, d = q.shape
    errors = []
    for padded in (False, True):
        for dbias_dtype in dict.fromkeys((torch.float32, q.dtype)):
            g = _new_graph(q.dtype, q.device)
            ports = [*(g.tensor_like(t) for t in (q, k, v, o, do, stats)), _bias_port(g, H, L, q.dtype, padded, "bias")]
            dbias = _bias_port(g, H, L, dbias_dtype, padded, "dBias")
            gq, gk, gv = g.sdpa_backward(name="sdpa_backward", q=ports[0], k=ports[1], v=ports[2], o=ports[3],
                                         dO=ports[4], stats=ports[5], bias=ports[6], dBias=dbias,
                                         attn_scale=d ** -0.5, use_deterministic_algorithm=deterministic)
            for port, like in ((gq, dq), (gk, dk), (gv, dv)):
                _output(port, like)
            try:
                return _Plan(g, (*ports, gq, gk, gv, dbias), _finish(g), dbias_dtype, padded)
            except Exception as e:  # noqa: BLE001 - cuDNN's own error types differ between its versions
                errors.append(f"{'padded' if padded else 'contiguous'} bias rows, d(bias) in {dbias_dtype}: "
                              f"{type(e).__name__}: {e}")
    raise RuntimeError("; ".join(errors))


def _plan(key: tuple, build: Any, *tensors: torch.Tensor) -> _Plan | None:
    """The plan cached under ``key``, built by ``build(*tensors)`` on first use; None where cuDNN refuses the graph
    (said once, in a warning naming the shape and cuDNN's reason; the refusal is cached too)."""
    with _LOCK:
        if key not in _PLANS:
            try:
                _PLANS[key] = build(*tensors)
            except Exception as e:  # noqa: BLE001 - cuDNN's error types differ between its versions
                B, H, L, d = tensors[0].shape
                # kept as text, without the traceback: its frames hold the call's tensors (q, k, v, ...), which the
                # cache would otherwise keep alive for the life of the process
                which = "forward" if key[0] == "fwd" else "backward"
                _PLANS[key] = RuntimeError(f"cuDNN refused the {which} graph of attention with a bias for B={B} H={H} "
                                           f"L={L} d={d} {tensors[0].dtype} on {tensors[0].device} "
                                           f"({type(e).__name__}: {e})")
                warnings.warn(f"{_PLANS[key]}: that {which} runs the Triton kernel (attn_impl=fused_bias) instead",
                              RuntimeWarning, stacklevel=2)
        plan = _PLANS[key]
    return None if isinstance(plan, Exception) else plan


def _fallback_bias(qkv: torch.Tensor, bias4: torch.Tensor, key: tuple) -> torch.Tensor:
    """The bias for the Triton kernel where cuDNN refused the graph under ``key``: ``[H, L, L]`` fp32 holding the
    values cuDNN adds (rounded to qkv's dtype), so that either kernel's backward matches either's forward.

    Raises:
        RuntimeError: the Triton kernel does not take these inputs either (cuDNN's reason and that, named).
    """
    H, L = bias4.shape[1], bias4.shape[2]
    bias3 = bias4.reshape(H, L, L).float()
    if not _triton.supported_packed(qkv, bias3):
        raise RuntimeError(f"{_PLANS[key]}; nor does the Triton kernel (it needs Triton on CUDA and a head dim of "
                           "16, 32, 64 or 128): use model.attn_impl=sdpa")
    return bias3


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """The op's own CUDA device made current (a custom op runs on whatever device is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op("beit::cudnn_bias_attention_fwd", mutates_args=())
def _fwd(qkv: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, _, H, d = qkv.shape
    q, k, v = _views(qkv)
    bias4 = bias.reshape(1, H, L, L).to(qkv.dtype).contiguous()
    with _on(qkv.device):
        key = _key("fwd", q, k, v, bias4)
        out = torch.empty((B, L, H, d), device=qkv.device, dtype=qkv.dtype)
        stats = torch.empty((B, H, L, 1), device=qkv.device, dtype=torch.float32)
        o = out.transpose(1, 2)
        plan = _plan(key, _build_fwd, q, k, v, bias4, o, stats)
        if plan is None:  # the Triton kernel: its log-sum-exp is cuDNN's statistics (natural log, scaled scores + bias)
            out, lse = _triton._fwd(qkv, _fallback_bias(qkv, bias4, key))
            return out, lse.reshape(B, H, L, 1).clone()
        if plan.bias_padded:
            bias4 = _bias_buffer(H, L, qkv.dtype, qkv.device, True).copy_(bias4)
        plan.run(qkv.device, q, k, v, bias4, o, stats)
    return out, stats


@_fwd.register_fake
def _(qkv, bias):  # noqa: ANN001, ANN202
    B, L, _, H, d = qkv.shape
    return qkv.new_empty((B, L, H, d)), qkv.new_empty((B, H, L, 1), dtype=torch.float32)


@torch.library.custom_op("beit::cudnn_bias_attention_bwd", mutates_args=())
def _bwd(do: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, stats: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, _, H, d = qkv.shape
    q, k, v = _views(qkv)
    bias4 = bias.reshape(1, H, L, L).to(qkv.dtype).contiguous()
    # torch.use_deterministic_algorithms(True): cuDNN's deterministic backward, which refuses a bias shared by the
    # batch (its sum over images is atomic), so such runs take the Triton kernel's backward: deterministic with its
    # default (BEIT_ATTN_BWD=split or twopass; onepass adds dQ atomically)
    det = torch.are_deterministic_algorithms_enabled()
    with _on(qkv.device):
        dqkv = torch.empty((B, L, 3, H, d), device=qkv.device, dtype=qkv.dtype)  # the qkv projection's layout
        dq, dk, dv = _views(dqkv)
        o, g = out.transpose(1, 2), do.contiguous().transpose(1, 2)
        key = (*_key("bwd", q, k, v, o, g, bias4), det)
        plan = _plan(key, functools.partial(_build_bwd, deterministic=det), q, k, v, o, g, stats, bias4, dq, dk, dv)
        if plan is None:
            dqkv, dbias = _triton._bwd(do, qkv, _fallback_bias(qkv, bias4, key), out, stats.reshape(B, H, L))
        else:
            if plan.bias_padded:
                bias4 = _bias_buffer(H, L, qkv.dtype, qkv.device, True).copy_(bias4)
            dbias = _bias_buffer(H, L, plan.dbias_dtype, qkv.device, plan.bias_padded)
            plan.run(qkv.device, q, k, v, o, g, stats, bias4, dq, dk, dv, dbias)
    # contiguous, as the fake says: with padded rows d(bias) is a strided view of a wider buffer (and a view
    # still where it is already in bias's dtype), which torch.compile's stride checks would reject
    return dqkv, dbias.reshape(bias.shape).to(bias.dtype).contiguous()


@_bwd.register_fake
def _(do, qkv, bias, out, stats):  # noqa: ANN001, ANN202
    return qkv.new_empty(qkv.shape), bias.new_empty(bias.shape)  # contiguous whatever bias's strides


_triton.register_autograd_pair(_fwd, _bwd)


def cudnn_bias_attention_packed(qkv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` on cuDNN's fused kernels, from the qkv projection's own layout.

    Args:
        qkv: ``[B, L, 3, H, d]`` CUDA tensor (q, k, v along dim 2; fp16 or bf16; unit stride in ``d``), e.g.
            ``linear(x).reshape(B, L, 3, H, d)``. Its gradient comes back in the same layout.
        bias: ``[H, L, L]`` or ``[1, H, L, L]``, shared by the batch (cast to qkv's dtype, as SDPA's mask is). Its
            gradient is summed over the batch by cuDNN.

    Returns:
        ``[B, L, H, d]`` in qkv's dtype, contiguous: ``.flatten(2)`` is the output projection's input.

    Raises:
        ValueError: for inputs :func:`supported_packed` refuses (check it first to fall back).
        RuntimeError: neither cuDNN nor the Triton kernel takes this shape (named, with cuDNN's reason); a shape
            only cuDNN refuses runs the Triton kernel, with a warning.
    """
    if (why := refusal(qkv, bias)) is not None:
        raise ValueError(f"cudnn_bias_attention does not take qkv {tuple(qkv.shape)} {qkv.dtype} on {qkv.device} "
                         f"with bias {None if bias is None else tuple(bias.shape)}: {why}")
    return _fwd(qkv, bias)[0]
