"""attn_impl="cudnn_bias" (models/attention_cudnn.py) without a GPU.

cuDNN itself runs only on CUDA (benchmarks/attention_kernel.py checks it there against the fp64 eager reference).
Here a stand-in ``cudnn`` module computes what cuDNN's ``sdpa`` / ``sdpa_backward`` graphs define, reading each
operand through the dims and strides the graph declared for it, so the tests check our side: the layouts we
declare for q, k, v inside the qkv projection's output, the output, the statistics and the gradients; the
autograd and fake registrations; the fallback for d(bias) in the inputs' dtype; the error for a refused shape;
and the CPU fallback of the model.
"""

from __future__ import annotations

import contextlib
import types
import warnings

import pytest
import torch

from beit.models import attention_cudnn as C
from beit.models.attention import ATTENTION_IMPLS, PACKED_ATTENTION_IMPLS, eager_attention, sdpa_attention


class _Port:
    def __init__(self, g: _Graph, dim: list[int], stride: list[int], dtype: str | None, name: str = "") -> None:
        self.g, self.dim, self.stride, self.dtype, self.name, self.output = g, list(dim), list(stride), dtype, name, False

    def set_output(self, v: bool) -> _Port:
        self.output = v
        return self

    def set_dim(self, dim: list[int]) -> _Port:
        self.dim = list(dim)
        return self

    def set_stride(self, stride: list[int]) -> _Port:
        self.stride = list(stride)
        return self

    def set_data_type(self, dtype: str) -> _Port:
        self.dtype = dtype
        return self


class _Graph:
    """What the module calls of ``cudnn.pygraph``; ``execute`` computes the node in fp64 with torch."""

    refuse_fp32_dbias = False
    refuse_unaligned_bias = False  # bias / d(bias) rows must start at 16-byte multiples (2-byte elements)
    built: list[_Graph] = []

    def __init__(self, io_data_type: str, intermediate_data_type: str, compute_data_type: str, handle: object) -> None:
        assert intermediate_data_type == compute_data_type == "FLOAT" and handle == "handle"
        self.io, self.node, self.args = io_data_type, None, {}

    def tensor_like(self, t: torch.Tensor) -> _Port:
        return _Port(self, list(t.shape), list(t.stride()), str(t.dtype))

    def tensor(self, name: str, dim: list[int], stride: list[int], data_type: str) -> _Port:
        return _Port(self, dim, stride, data_type, name)

    def sdpa(self, name: str, q, k, v, bias, generate_stats: bool, attn_scale: float):  # noqa: ANN001
        self.node, self.args = "fwd", dict(q=q, k=k, v=v, bias=bias, scale=attn_scale)
        self.out = (_Port(self, [], [], None), _Port(self, [], [], None))
        assert generate_stats
        return self.out

    def sdpa_backward(self, name: str, q, k, v, o, dO, stats, bias, dBias, attn_scale: float,  # noqa: ANN001, N803
                      use_deterministic_algorithm: bool):
        self.node = "bwd"
        self.args = dict(q=q, k=k, v=v, o=o, dO=dO, stats=stats, bias=bias, dBias=dBias, scale=attn_scale,
                         det=use_deterministic_algorithm)
        self.out = tuple(_Port(self, [], [], None) for _ in range(3))
        return self.out

    def validate(self) -> None:
        for p in self.out:
            assert p.output and p.dim, "every output declared, with its dims and strides"

    def build_operation_graph(self) -> None: ...

    def create_execution_plans(self, modes: list) -> None:
        assert modes == ["A", "FALLBACK"]

    def check_support(self) -> None:
        if self.node == "bwd" and self.refuse_fp32_dbias and self.args["dBias"].dtype == "FLOAT":
            raise RuntimeError("dBias must match the io data type")
        rows = [self.args[n].stride[2] for n in ("bias", "dBias") if n in self.args]
        if self.refuse_unaligned_bias and any(r * 2 % 16 for r in rows):
            raise RuntimeError("bias rows must be 16-byte aligned")
        if self.node == "bwd" and self.args["det"] and self.args["q"].dim[0] > 1:  # as cuDNN: atomics over B
            raise RuntimeError("deterministic dBias requires a per-batch bias when B > 1")

    def build_plans(self) -> None:
        _Graph.built.append(self)

    def get_workspace_size(self) -> int:
        return 16

    def execute(self, pack: dict, workspace: torch.Tensor, handle: object) -> None:
        assert handle == "handle" and workspace.numel() == 16

        def read(port: _Port) -> torch.Tensor:  # the bound tensor must be what the port declared
            t = pack[port]
            assert list(t.shape) == port.dim and list(t.stride()) == port.stride, (port.dim, port.stride)
            return t.double()

        a = self.args
        q, k, v, bias = read(a["q"]), read(a["k"]), read(a["v"]), read(a["bias"])
        assert list(bias.shape)[0] == 1  # one bias for the batch
        s = q @ k.transpose(-2, -1) * a["scale"] + bias
        if self.node == "fwd":
            o, stats = self.out
            read(o), read(stats)
            pack[o].copy_(s.softmax(-1) @ v)
            pack[stats].copy_(s.logsumexp(-1, keepdim=True))
            return
        p = (s - read(a["stats"])).exp()  # the forward's statistics, as cuDNN recomputes P
        do = read(a["dO"])
        dv = p.transpose(-2, -1) @ do
        dp = do @ v.transpose(-2, -1)
        ds = p * (dp - (do * read(a["o"])).sum(-1, keepdim=True))
        dq, dk = ds @ k * a["scale"], ds.transpose(-2, -1) @ q * a["scale"]
        for port, val in zip(self.out, (dq, dk, dv)):
            read(port)
            pack[port].copy_(val)
        read(a["dBias"])
        pack[a["dBias"]].copy_(ds.sum(0, keepdim=True))


@pytest.fixture
def fake_cudnn(monkeypatch):
    fake = types.ModuleType("cudnn")
    fake.data_type = types.SimpleNamespace(HALF="HALF", BFLOAT16="BFLOAT16", FLOAT="FLOAT")
    fake.heur_mode = types.SimpleNamespace(A="A", FALLBACK="FALLBACK")
    fake.pygraph = _Graph
    fake.streams = []
    fake.set_stream = lambda handle, stream: fake.streams.append((handle, stream))
    monkeypatch.setattr(C, "_cudnn", lambda: fake)
    monkeypatch.setattr(C, "_handle", lambda device: "handle")
    monkeypatch.setattr(C, "_stream", lambda device: 7)
    monkeypatch.setattr(C, "_PLANS", {})
    monkeypatch.setattr(_Graph, "built", [])
    monkeypatch.setattr(_Graph, "refuse_fp32_dbias", False)
    monkeypatch.setattr(_Graph, "refuse_unaligned_bias", False)
    return fake


def _case(B=2, L=7, H=3, d=8, dtype=torch.float32, seed=0):  # noqa: ANN001, ANN202
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, L, 3, H, d, generator=g).to(dtype)
    bias = torch.randn(H, L, L, generator=g)
    return qkv, bias


def _eager(qkv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return eager_attention(q, k, v, bias.unsqueeze(0)).transpose(1, 2)  # [B, L, H, d]


def test_forward_and_all_gradients_match_the_eager_formula(fake_cudnn):
    qkv, bias = _case()
    a = (qkv.clone().requires_grad_(), bias.clone().requires_grad_())
    r = (qkv.double().requires_grad_(), bias.double().requires_grad_())
    out, stats = C._fwd(*a)
    ref = _eager(*r)
    assert out.shape == (2, 7, 3, 8) and out.is_contiguous() and stats.shape == (2, 3, 7, 1)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, a, g)
    want = torch.autograd.grad(ref, r, g.double())
    assert got[0].shape == qkv.shape and got[1].shape == bias.shape and got[1].dtype == bias.dtype
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y, atol=1e-5, rtol=1e-5)
    assert fake_cudnn.streams == [("handle", 7)] * 2  # each run on the caller's stream
    fwd, bwd = _Graph.built
    # q, k, v are read in place from the [B, L, 3, H, d] projection: [B, H, L, d] dims, the projection's strides
    assert fwd.args["q"].dim == [2, 3, 7, 8] and fwd.args["q"].stride == [7 * 3 * 3 * 8, 8, 3 * 3 * 8, 1]
    assert fwd.args["bias"].dim == [1, 3, 7, 7] and fwd.args["scale"] == 8 ** -0.5
    assert bwd.args["dBias"].dtype == "FLOAT"  # the batch sum asked for in fp32 first


def test_plans_are_built_once_per_shape_and_dbias_falls_back_to_the_inputs_dtype(fake_cudnn):
    _Graph.refuse_fp32_dbias = True
    qkv, bias = _case(dtype=torch.bfloat16)
    x = qkv.clone().requires_grad_()
    for _ in range(2):
        C._fwd(x, bias.requires_grad_())[0].sum().backward()
    kinds = [(g.node, g.args.get("dBias") and g.args["dBias"].dtype) for g in _Graph.built]
    assert kinds == [("fwd", None), ("bwd", "BFLOAT16")]  # the fp32 d(bias) graph refused, not rebuilt
    C._fwd(_case(L=5)[0], _case(L=5)[1])  # another shape: another plan
    assert len(_Graph.built) == 3


def _child(code: str) -> str:
    """Run ``code`` in a child Python that imports the ``beit`` this test imported; its stdout (exit status 0
    asserted)."""
    import os
    import subprocess
    import sys

    import beit

    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(beit.__file__))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_cached_graphs_are_dropped_at_exit():
    """The plans go at exit, before the interpreter's teardown (where the frontend's bindings report live graphs
    as leaks): a cached object's finaliser runs while ``sys.is_finalizing()`` is still False."""
    code = ("import sys\nfrom beit.models import attention_cudnn as C\n"
            "class Plan:\n    def __del__(self):\n"
            "        print('during teardown' if sys.is_finalizing() else 'before teardown', flush=True)\n"
            "C._PLANS[('fwd',)] = Plan()\n")
    assert _child(code).strip() == "before teardown"


def test_the_exit_hook_does_not_hang_on_a_lock_held_elsewhere():
    """A daemon thread that holds the plans' lock and never lets go (a plan being built at exit, or the lock as a
    fork copied it) costs the exit a moment, not a hang (a hang: the child's 120 s timeout fails the test)."""
    code = ("import threading\nfrom beit.models import attention_cudnn as C\n"
            "C._EXIT_LOCK_WAIT_S = 0.1\nheld = threading.Event()\n"
            "def hold():\n    with C._LOCK:\n        held.set()\n        threading.Event().wait()\n"
            "threading.Thread(target=hold, daemon=True).start()\nheld.wait()\n")
    _child(code)


def _fake_triton(monkeypatch) -> list[str]:  # noqa: ANN001
    """A stand-in for the Triton kernel's ops (``attention_triton._fwd`` / ``_bwd``) that, like them, returns the
    log-sum-exp of the scaled scores plus the bias and recomputes P from it in the backward."""
    calls: list[str] = []

    def scores(qkv: torch.Tensor, bias3: torch.Tensor) -> tuple[torch.Tensor, ...]:
        assert bias3.dtype == torch.float32 and bias3.dim() == 3  # [H, L, L] fp32, as the kernel takes it
        q, k, v = qkv.double().permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v, q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias3.double()

    def fwd(qkv: torch.Tensor, bias3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append("fwd")
        _, _, v, s = scores(qkv, bias3)
        return (s.softmax(-1) @ v).transpose(1, 2).to(qkv.dtype).contiguous(), s.logsumexp(-1).float()

    def bwd(do, qkv, bias3, out, lse):  # noqa: ANN001, ANN202
        calls.append("bwd")
        q, k, v, s = scores(qkv, bias3)
        assert lse.shape == s.shape[:3]
        do, o = do.double().transpose(1, 2), out.double().transpose(1, 2)
        p = (s - lse.double()[..., None]).exp()
        ds = p * (do @ v.transpose(-2, -1) - (do * o).sum(-1, keepdim=True))
        dq, dk, dv = ds @ k * q.shape[-1] ** -0.5, ds.transpose(-2, -1) @ q * q.shape[-1] ** -0.5, p.transpose(-2, -1) @ do
        return torch.stack((dq, dk, dv), 2).permute(0, 3, 2, 1, 4).to(qkv.dtype), ds.sum(0).float()

    monkeypatch.setattr(C, "_triton", types.SimpleNamespace(supported_packed=lambda qkv, b: True, _fwd=fwd, _bwd=bwd))
    return calls


def _check_grads(qkv: torch.Tensor, bias: torch.Tensor) -> None:
    a = (qkv.clone().requires_grad_(), bias.clone().requires_grad_())
    r = (qkv.double().requires_grad_(), bias.double().requires_grad_())
    out, ref = C._fwd(*a)[0], _eager(*r)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    for x, y in zip(torch.autograd.grad(out, a, g), torch.autograd.grad(ref, r, g.double())):
        torch.testing.assert_close(x.double(), y, atol=1e-5, rtol=1e-5)


def test_a_refused_shape_is_warned_once_and_runs_the_triton_kernel(fake_cudnn, monkeypatch):
    monkeypatch.setattr(_Graph, "build_plans", lambda self: (_ for _ in ()).throw(RuntimeError("no engine")))
    calls = _fake_triton(monkeypatch)
    qkv, bias = _case()
    with pytest.warns(RuntimeWarning, match=r"B=2 H=3 L=7 d=8 .*no engine.*runs the Triton kernel") as said:
        _check_grads(qkv, bias)
    assert calls == ["fwd", "bwd"]  # one warning for each refused graph, naming it
    assert ["forward graph" in str(w.message) for w in said] == [True, False]
    assert ["backward graph" in str(w.message) for w in said] == [False, True]
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        _check_grads(qkv, bias)  # cached: no new warning, no rebuild
    assert not again and calls == ["fwd", "bwd"] * 2 and len(_Graph.built) == 0


def test_a_shape_neither_kernel_takes_names_both_and_sdpa(fake_cudnn, monkeypatch):
    monkeypatch.setattr(_Graph, "build_plans", lambda self: (_ for _ in ()).throw(RuntimeError("no engine")))
    qkv, bias = _case()  # on CPU the Triton kernel does not run either
    for _ in range(2):  # the refusal is cached, and said again
        with pytest.warns(RuntimeWarning) if _ == 0 else contextlib.nullcontext():
            with pytest.raises(RuntimeError, match=r"B=2 H=3 L=7 d=8 .*no engine.*nor does the Triton.*attn_impl=sdpa"):
                C._fwd(qkv, bias)


def test_deterministic_mode_takes_the_triton_backward_after_cudnns_forward(fake_cudnn, monkeypatch):
    calls = _fake_triton(monkeypatch)
    qkv, bias = _case()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.warns(RuntimeWarning, match="deterministic dBias"):
            _check_grads(qkv, bias)  # cuDNN's statistics feed the Triton backward: the same convention
    finally:
        torch.use_deterministic_algorithms(False)
    assert calls == ["bwd"] and [g.node for g in _Graph.built] == ["fwd"]


def test_a_cudnn_wanting_aligned_bias_rows_gets_them_padded(fake_cudnn):
    _Graph.refuse_unaligned_bias = True
    qkv, bias = _case(L=7)  # 7 two-byte values a row: not 16-byte aligned
    _check_grads(qkv, bias)  # the bias read, and d(bias) written, through padded rows
    fwd, bwd = _Graph.built
    assert fwd.args["bias"].stride == [3 * 7 * 8, 7 * 8, 8, 1] and bwd.args["dBias"].stride == [3 * 7 * 8, 7 * 8, 8, 1]
    # d(bias) comes back contiguous (as the fake kernel says; torch.compile checks the strides), not as a view of
    # the padded rows, also where it is already in the bias's dtype (fp32 d(bias), fp32 bias: no copy by .to)
    qkv, bias = _case(B=1, L=5, H=2)
    out, stats = C._fwd(qkv, bias)
    dbias = C._bwd(torch.randn_like(out), qkv, bias, out, stats)[1]
    assert _Graph.built[-1].args["dBias"].stride == [2 * 5 * 8, 5 * 8, 8, 1] and dbias.is_contiguous()
    torch.library.opcheck(C._bwd, (torch.randn_like(out), qkv, bias, out, stats),
                          test_utils=("test_schema", "test_faketensor"))


def test_the_ops_registrations_pass_opcheck(fake_cudnn):
    qkv, bias = _case(B=1, L=5, H=2)
    torch.library.opcheck(C._fwd, (qkv.requires_grad_(), bias.requires_grad_()),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, stats = C._fwd(qkv.detach(), bias.detach())
    torch.library.opcheck(C._bwd, (torch.randn_like(out), qkv.detach(), bias.detach(), out, stats),
                          test_utils=("test_schema", "test_faketensor"))
    # a bias with other strides (dense, not contiguous): its gradient is contiguous, in the fake kernel too
    permuted = bias.detach().permute(1, 2, 0).contiguous().permute(2, 0, 1)
    torch.library.opcheck(C._bwd, (torch.randn_like(out), qkv.detach(), permuted, out, stats),
                          test_utils=("test_schema", "test_faketensor"))


def test_supported_packed_refuses_cpu_dropout_fp32_and_odd_shapes():
    qkv, bias = _case(dtype=torch.bfloat16)
    assert not C.supported_packed(qkv, bias)  # CPU
    if not torch.cuda.is_available():
        return
    q = qkv.cuda()
    assert not C.supported_packed(q, bias.cuda(), dropout_p=0.1)
    assert not C.supported_packed(q.float(), bias.cuda())
    assert not C.supported_packed(q, bias[:, :3].cuda())
    assert not C.supported_packed(q, None)


def test_cudnn_bias_on_cpu_falls_back_to_the_same_numbers_as_sdpa():
    qkv, bias = _case()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    ref = sdpa_attention(q, k, v, bias)
    torch.testing.assert_close(ATTENTION_IMPLS["cudnn_bias"](q, k, v, bias), ref)
    packed = PACKED_ATTENTION_IMPLS["cudnn_bias"](qkv, bias)
    torch.testing.assert_close(packed, ref.transpose(1, 2).flatten(2))


def test_a_cached_refusal_does_not_keep_the_calls_tensors_alive(fake_cudnn, monkeypatch):
    import gc
    import weakref

    monkeypatch.setattr(_Graph, "build_plans", lambda self: (_ for _ in ()).throw(RuntimeError("no engine")))
    qkv, bias = _case()
    alive = weakref.ref(qkv)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no engine"):
        C._fwd(qkv, bias)
    del qkv
    gc.collect()
    assert alive() is None  # the refusal stays cached, the activations of the refused call do not


def test_each_refusal_is_checked_and_named_on_any_machine(monkeypatch):
    monkeypatch.setattr(C, "HAS_CUDNN_FRONTEND", True)  # the reasons below are the module's, not the package's
    qkv, bias = _case(dtype=torch.bfloat16)
    cases = [
        ((qkv, bias, 0.1), "dropout 0.1"),
        ((qkv, None, 0.0), "no bias"),
        ((qkv.float(), bias, 0.0), "float32"),
        ((_case(d=12, dtype=torch.bfloat16)[0], bias, 0.0), "head dim 12"),
        ((_case(d=136, dtype=torch.bfloat16)[0], bias, 0.0), "head dim 136"),
        ((qkv, bias[:, :3], 0.0), "bias (3, 3, 7)"),
        ((qkv, bias.expand(2, 3, 7, 7), 0.0), "bias (2, 3, 7, 7)"),
        ((qkv, bias, 0.0), "cpu tensors"),  # everything else would be taken: only the device is left
    ]
    for args, why in cases:
        assert not C.supported_packed(*args) and why in C.refusal(*args), (why, C.refusal(*args))
    with pytest.raises(ValueError, match="head dim 12"):
        C.cudnn_bias_attention_packed(_case(d=12, dtype=torch.bfloat16)[0], bias)
    monkeypatch.setattr(C, "HAS_CUDNN_FRONTEND", False)
    assert "nvidia-cudnn-frontend" in C.refusal(qkv, bias)


def test_concurrent_calls_each_launch_on_their_own_stream(fake_cudnn, monkeypatch):
    import threading

    qkv, bias = _case()
    C._fwd(qkv, bias)  # the plan, built once
    handle_stream: dict[str, int] = {}
    meet = threading.Barrier(2, timeout=0.5)

    def set_stream(handle, stream):  # noqa: ANN001, ANN202 - waits for the other thread to set its stream too
        handle_stream["now"] = stream
        try:
            meet.wait()
        except threading.BrokenBarrierError:
            pass

    seen = []
    run = _Graph.execute

    def execute(self, pack, workspace, handle):  # noqa: ANN001, ANN202
        seen.append(handle_stream["now"] == threading.get_ident())  # launched on the stream this call set
        run(self, pack, workspace, handle)

    fake_cudnn.set_stream = set_stream
    monkeypatch.setattr(C, "_stream", lambda device: threading.get_ident())  # each thread its own stream
    monkeypatch.setattr(_Graph, "execute", execute)
    threads = [threading.Thread(target=C._fwd, args=(qkv, bias)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [True, True]


_MIXED = '''
import sys, types, warnings, torch
sys.path.insert(0, sys.argv[1])
import test_attention_cudnn as TC
from beit.models import attention_cudnn as C, attention_triton as T
fake = types.ModuleType("cudnn")
fake.data_type = types.SimpleNamespace(HALF="HALF", BFLOAT16="BFLOAT16", FLOAT="FLOAT")
fake.heur_mode = types.SimpleNamespace(A="A", FALLBACK="FALLBACK")
fake.pygraph, fake.set_stream = TC._Graph, lambda handle, stream: None
C._cudnn, C._handle, C._stream = (lambda: fake), (lambda d: "handle"), (lambda d: 7)
T.supported = T.supported_packed = lambda *a, **k: True  # CPU tensors, run by Triton's interpreter
warnings.simplefilter("ignore", RuntimeWarning)
torch.manual_seed(0)
qkv, bias = torch.randn(3, 37, 3, 2, 16), 2 * torch.randn(2, 37, 37)
s = (lambda q, k: q @ k.transpose(-2, -1) * 16 ** -0.5)(*qkv.double().permute(2, 0, 3, 1, 4).unbind(0)[:2])
assert (T._fwd(qkv, bias)[1].double() - (s + bias.double()).logsumexp(-1)).abs().max() < 1e-5  # cuDNN's Stats
refuse = {"fwd": lambda self: self.node == "fwd", "bwd": lambda self: self.node == "bwd"}
check = TC._Graph.check_support
for name, refused in refuse.items():  # each mix: Triton forward + cuDNN backward, cuDNN forward + Triton backward
    TC._Graph.check_support = lambda self: (_ for _ in ()).throw(RuntimeError("no")) if refused(self) else check(self)
    C._PLANS.clear()
    TC._check_grads(qkv, bias)
print("OK")
'''


def test_the_real_triton_kernel_and_cudnn_follow_each_others_forward():
    """The real Triton ops (in Triton's interpreter) against the cuDNN stand-in: its log-sum-exp is cuDNN's
    statistics, so either backward takes the other's forward (the stand-in ``_fake_triton`` above only assumes it)."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    here = os.path.dirname(__file__)
    env = dict(os.environ, TRITON_INTERPRET="1", BEIT_ATTN_BWD="split")
    proc = subprocess.run([sys.executable, "-c", _MIXED, here], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
