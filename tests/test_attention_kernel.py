"""The fused-bias Triton attention kernel: numerics in Triton's CPU interpreter, and the SDPA fallback.

The GPU run of the same checks (bf16/fp32, BEiT's sequence lengths) is ``benchmarks/attention_kernel.py``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import beit
from beit.models import attention_triton
from beit.models.attention import ATTENTION_IMPLS, eager_attention

_INTERPRETED = textwrap.dedent("""
    import os
    import torch
    import beit
    from beit.models import attention_triton as T
    from beit.models.attention import eager_attention
    T.supported = T.supported_packed = lambda *a, **k: True  # CPU tensors, run by Triton's interpreter
    assert T.BWD == os.environ["BEIT_ATTN_BWD"] == "onepass", T.BWD  # the environment variable picks the backward
    T.DBIAS_CHUNKS = 2  # B = 5 -> chunks of 3 and 2 images: the uneven split of the d(bias) reduction
    T.ONEPASS_CHUNKS = 2  # the same for the one- and two-pass kernels' batch chunks
    # 64-row query blocks: at L 20 and 37 those kernels sum d(bias) in registers, at 65 and 70 in memory (B 3 at
    # L 70: a chunk of 2 images, so the second image adds to the d(bias) the first one stored)
    T.CONFIGS["onepass"] = T.CONFIGS["twopass"] = (64, 32, 4, 2)
    worst = {}  # (backward, tensor) -> max |error| / max |reference|
    names = ("out", "dq", "dk", "dv", "dbias")

    def err(bwd, got, want):
        for n, a, b in zip(names, got, want):
            assert a.shape == b.shape, (a.shape, b.shape)
            e = ((a.double() - b).abs().max() / b.abs().max()).item()
            worst[bwd, n] = max(worst.get((bwd, n), 0.0), e)

    def packed_grads(qkv, wide, out, g):  # [out, dq, dk, dv] of the packed form; the padding gets no gradient
        H, d = qkv.shape[3], qkv.shape[4]
        dw = g[0]
        assert not dw[..., 3 * H * d:].any()
        return [out, *dw[..., : 3 * H * d].reshape(qkv.shape).unbind(2), g[1]]

    for bwd in T.BACKWARDS:
        T.BWD = bwd
        torch.manual_seed(0)
        for B, H, L, d in [(2, 2, 37, 16), (1, 3, 65, 32), (3, 1, 70, 64), (5, 2, 20, 16)]:
            bias = (2 * torch.randn(1, H, L, L)).requires_grad_()
            # packed, as the model calls it: a [B, L, 3, H, d] view with a row stride larger than 3 * H * d
            wide = torch.randn(B, L, 3 * H * d + 8, dtype=torch.float64).float().requires_grad_()
            qkv = wide[..., : 3 * H * d].reshape(B, L, 3, H, d)
            g = torch.randn(B, L, H, d)
            out = T.fused_bias_attention_packed(qkv, bias)  # the custom op, with its autograd formula
            got = packed_grads(qkv, wide, out, torch.autograd.grad(out, (wide, bias), g))
            q, k, v = (t.double() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
            ref = eager_attention(q, k, v, bias.double()).transpose(1, 2)
            want = packed_grads(qkv, wide, ref, torch.autograd.grad(ref, (wide, bias), g.double()))
            err(bwd, got, want)
            # the [B, H, L, d] interface
            q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
            gh = g.transpose(1, 2)
            out = T.fused_bias_attention(q, k, v, bias[0])
            got = [out, *torch.autograd.grad(out, (q, k, v, bias), gh)]
            ref = eager_attention(*(t.double() for t in (q, k, v, bias)))
            err(bwd, got, [ref, *torch.autograd.grad(ref, (q, k, v, bias), gh.double())])
    T.BWD = "nope"
    try:
        T.fused_bias_attention_packed(qkv, bias).sum().backward()
    except ValueError as e:
        assert "BEIT_ATTN_BWD" in str(e) and "onepass" in str(e), e
    else:
        raise AssertionError("an unknown backward ran")
    # the model's attention on the packed path: output and every gradient equal the SDPA model's
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5,
              use_rel_pos_bias=True)
    a = beit.create_model("beit_tiny_patch16_224", attn_impl="sdpa", **kw).double()
    b = beit.create_model("beit_tiny_patch16_224", attn_impl="fused_bias", **kw).double()
    for blk in a.blocks:  # a bias that matters (the tables start at zero)
        torch.nn.init.normal_(blk.attn.relative_position_bias_table, std=0.5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ya = a(x)
    ya.square().sum().backward()
    model_err = {}
    for bwd in T.BACKWARDS:
        T.BWD = bwd
        b.zero_grad()
        yb = b(x)
        yb.square().sum().backward()
        model_err[bwd] = (ya - yb).abs().max().item()
        for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
            if pa.grad is not None:
                model_err[bwd] = max(model_err[bwd], ((pa.grad - pb.grad).abs().max()
                                                      / pa.grad.abs().max().clamp_min(1e-12)).item())
    # the ops' registration (schema, fake tensors for torch.compile, autograd) as torch.library checks it
    qkv = torch.randn(2, 37, 3 * 2 * 16 + 8)[..., : 3 * 2 * 16].reshape(2, 37, 3, 2, 16).requires_grad_()
    bias = torch.randn(2, 37, 37, requires_grad=True)
    out, lse = T._fwd(qkv, bias)
    for bwd in T.BACKWARDS:
        T.BWD = bwd
        for op, args in ((T._fwd, (qkv, bias)), (T._bwd, (torch.randn(2, 37, 2, 16), qkv, bias, out, lse))):
            res = torch.library.opcheck(op, tuple(a.detach() if op is T._bwd else a for a in args))
            assert all(v == "SUCCESS" for v in res.values()), (bwd, res)
    for bwd in T.BACKWARDS:
        print("MODEL", bwd, model_err[bwd])
        print("WORST", bwd, max(worst[bwd, n] for n in names), " ".join(f"{n} {worst[bwd, n]:.1e}" for n in names))
""")


def _interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels here, or None. Triton before 3.8 turns a scalar kernel
    argument (a 1-element array) into an int with ``int(array)``, which NumPy 2.4 refuses ("only 0-dimensional
    arrays ..."; Triton 3.8 squeezes it first): torch 2.11's Triton 3.6 with a new NumPy cannot interpret a
    kernel whose loop bound is an argument. The real kernel is not affected."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    import numpy as np
    import triton

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8):
        try:
            int(np.zeros(1))
        except TypeError:
            return (f"Triton {triton.__version__}'s interpreter cannot run on NumPy {np.__version__} (fixed in "
                    "Triton 3.8); on a GPU the same checks are benchmarks/attention_kernel.py")
    return None


@pytest.mark.skipif(_interpreter_problem() is not None, reason=str(_interpreter_problem()))
def test_kernel_matches_eager_in_triton_interpreter():
    """Every backward (``attention_triton.BACKWARDS``: the split kernels, and the two- and one-pass kernels that
    fold d(bias) and dQ into the dK/dV pass) against the fp64 eager reference, on uneven lengths, batch sizes
    1, 2, 3 and 5 (uneven batch splits) and head dims 16, 32 and 64."""
    env = dict(os.environ, TRITON_INTERPRET="1", BEIT_ATTN_BWD="onepass")
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split() for line in proc.stdout.splitlines()]
    worst = {w[1]: float(w[2]) for w in lines if w[0] == "WORST"}
    model = {w[1]: float(w[2]) for w in lines if w[0] == "MODEL"}
    assert set(worst) == set(model) == set(attention_triton.BACKWARDS), proc.stdout
    for bwd in attention_triton.BACKWARDS:
        assert worst[bwd] < 1e-5, proc.stdout  # fp32 kernel vs fp64 reference: output, dq, dk, dv, summed d(bias)
        assert model[bwd] < 1e-6, proc.stdout  # the packed path (fp32 accumulation) vs SDPA in an fp64 model


def test_supported_refuses_what_the_kernel_cannot_take():
    q = torch.randn(2, 3, 10, 16)
    bias = torch.randn(1, 3, 10, 10)
    assert not attention_triton.supported(q, q, q, bias)  # CPU tensors
    if torch.cuda.is_available() and attention_triton.HAS_TRITON:  # pragma: no cover - GPU machines
        qc, bc = q.cuda(), bias.cuda()
        assert attention_triton.supported(qc, qc, qc, bc)
        assert not attention_triton.supported(qc, qc, qc, bc, dropout_p=0.1)
        assert not attention_triton.supported(qc, qc, qc, None)
        assert not attention_triton.supported(qc, qc, qc, torch.randn(2, 3, 10, 10, device="cuda"))  # per-image
        q24 = torch.randn(2, 3, 10, 24, device="cuda")
        assert not attention_triton.supported(q24, q24, q24, bc)  # head dim not a power of two
    with pytest.raises(ValueError, match="does not take"):
        attention_triton.fused_bias_attention(q, q, q, bias)


def test_fused_bias_impl_falls_back_to_sdpa_off_gpu():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 17, 16).unbind(0)
    bias = torch.randn(1, 4, 17, 17)
    torch.testing.assert_close(ATTENTION_IMPLS["fused_bias"](q, k, v, bias), eager_attention(q, k, v, bias),
                               rtol=1e-5, atol=1e-5)
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)
    a = beit.create_model("beit_tiny_patch16_224", attn_impl="sdpa", **kw).eval()
    b = beit.create_model("beit_tiny_patch16_224", attn_impl="fused_bias", **kw).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_a_launch_that_does_not_fit_shared_memory_takes_a_smaller_config(monkeypatch):
    """On an H100, fp32 inputs at head dim 128 asked the d(bias) kernel's tuned config for 256 KiB of shared memory
    (the GPU has 227 KiB) and the backward failed with OutOfResources. Now the launch retries with fewer stages,
    then smaller tiles, and remembers what fitted."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(attention_triton, "_FITTED", {})
    calls = []

    class Kernel:  # as a Triton kernel: kernel[grid](*args, BM=.., BN=.., num_warps=.., num_stages=..)
        def __getitem__(self, grid):
            def run(*args, BM, BN, num_warps, num_stages, **consts):
                calls.append((grid, BM, BN, num_stages))
                if BM * BN * num_stages > 64 * 64:  # "the GPU's shared memory"
                    raise OutOfResources(BM * BN * num_stages * 64, 232448, "shared memory")
            return run

    like = torch.empty(1, dtype=torch.float32)
    attention_triton._launch("dbias", Kernel(), lambda bm, bn: (bm, bn), like, 128, "arg", D=128)
    bm, bn, _, stages = attention_triton.CONFIGS["dbias"]
    assert calls[0] == ((bm, bn), bm, bn, stages) and calls[-1][1] * calls[-1][2] * calls[-1][3] <= 64 * 64
    fitted = attention_triton._FITTED[("dbias", 128, torch.float32, like.device)]
    calls.clear()
    attention_triton._launch("dbias", Kernel(), lambda bm, bn: (bm, bn), like, 128, "arg", D=128)
    assert calls == [((fitted[0], fitted[1]), fitted[0], fitted[1], fitted[3])]  # remembered: one launch

    class NeverFits(Kernel):
        def __getitem__(self, grid):
            def run(*args, **kw):
                raise OutOfResources(1 << 20, 232448, "shared memory")
            return run

    with pytest.raises(OutOfResources):  # nothing fits: the error, not a silent skip
        attention_triton._launch("fwd", NeverFits(), lambda bm, bn: (bm, bn), like, 128, "arg", D=128)


def test_onepass_batch_chunks(monkeypatch):
    """The one- and two-pass kernels split the batch into chunks (each chunk's d(bias) partial sum is added after):
    about ONEPASS_WAVES programs a multiprocessor, never more chunks than images, ONEPASS_CHUNKS overrides."""
    pytest.importorskip("triton")

    class Props:
        multi_processor_count = 132  # an H100

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    cuda = torch.device("cuda")
    programs = 12 * -(-197 // attention_triton._cfg("onepass", 64)[1])  # heads x key blocks at BEiT-B's shape
    chunks = attention_triton._onepass_chunks(128, 12, 197, 64, cuda)
    assert chunks == round(attention_triton.ONEPASS_WAVES * 132 / programs)
    assert attention_triton._onepass_chunks(2, 12, 197, 64, cuda) == 2  # no more chunks than images
    assert attention_triton._onepass_chunks(128, 16, 1025, 64, cuda) == 1  # enough programs without a split
    monkeypatch.setattr(attention_triton, "ONEPASS_CHUNKS", 64)
    assert attention_triton._onepass_chunks(128, 12, 197, 64, cuda) == 64
    assert attention_triton._onepass_chunks(5, 12, 197, 64, cuda) == 5
