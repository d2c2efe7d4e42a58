"""The engine's per-step pieces and its host-thread policy: the grad norm (clipped or not), the weights probe,
and the intra-op thread cap beside DataLoader workers."""

from __future__ import annotations

import math

import pytest
import torch

from beit.engine import threads
from beit.engine.trainer import _weights_probe, grad_norm_


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(4, 3), (7,), (2, 2, 2)]]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 3
    return ps


def test_grad_norm_without_clip_leaves_grads_and_equals_torch():
    ps = _params()
    before = [p.grad.clone() for p in ps]
    norm = grad_norm_(ps, None)
    want = torch.cat([g.flatten() for g in before]).norm()
    assert norm.dtype == torch.float32 and norm.ndim == 0
    torch.testing.assert_close(norm, want)
    assert all(torch.equal(p.grad, b) for p, b in zip(ps, before))


def test_grad_norm_with_clip_scales_grads_like_clip_grad_norm():
    ps, ref = _params(), _params()
    norm = grad_norm_(ps, 1.0)
    want = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    torch.testing.assert_close(norm, want.float())
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.grad, r.grad)
    assert torch.cat([p.grad.flatten() for p in ps]).norm() == pytest.approx(1.0, rel=1e-4)


def test_weights_probe_flags_non_finite_weights_of_any_dtype():
    ps = _params()
    assert float(_weights_probe(ps)) == 0.0
    mixed = ps + [torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))]
    assert float(_weights_probe(mixed)) == 0.0
    with torch.no_grad():
        mixed[-1][1] = math.inf
    assert math.isnan(float(_weights_probe(mixed)))
    big = [torch.nn.Parameter(torch.full((4,), 60000.0, dtype=torch.float16))]  # finite, L2 norm 120,000 > fp16 max
    assert float(_weights_probe(big)) == 0.0
    with torch.no_grad():
        big[0][2] = math.nan
    assert math.isnan(float(_weights_probe(big)))
    assert float(_weights_probe([torch.randn(3, dtype=torch.float64), torch.ones(2).half()])) == 0.0  # no narrowing


def test_intra_op_threads_shrink_beside_loader_workers_on_cuda_only(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 16)
    set_to: list[int] = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    assert threads.cap_intra_op_threads("cpu", 14) is None  # a CPU run computes on that pool
    assert threads.cap_intra_op_threads("cuda", 0) is None  # no workers: nothing competes
    assert threads.cap_intra_op_threads("cuda", 14) == 1 and set_to == [1]
    assert threads.cap_intra_op_threads("cuda", 4) == 11 and set_to == [1, 11]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert threads.cap_intra_op_threads("cuda", 1) is None  # 14 cores left: a pool of 8 stays as it is
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert threads.cap_intra_op_threads("cuda", 14) is None and set_to == [1, 11]  # the user's choice stands


def test_cores_count_the_cgroup_cpu_quota(tmp_path, monkeypatch):
    """A container limited to 4 cores' time (``--cpus=4``) on a bigger host counts 4, not the host's cores."""
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("400000 100000\n")
    assert threads._cgroup_cpus(v2) == 4
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert threads._cgroup_cpus(v2) == 2  # 1.5 cores: rounded up
    (v2 / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_cpus(v2) is None  # unlimited
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads._cgroup_cpus(v1) == 2
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads._cgroup_cpus(v1) is None
    assert threads._cgroup_cpus(tmp_path / "none") is None  # no cgroup files: the affinity mask alone
    monkeypatch.setattr(threads, "CGROUP_ROOT", v2)
    (v2 / "cpu.max").write_text("100000 100000\n")
    assert threads.usable_cores() == 1  # the quota caps the affinity mask


def test_cgroup_quota_of_a_nested_cgroup_is_the_smallest_up_to_the_root(tmp_path):
    """Outside a cgroup namespace (a systemd slice, a batch job) the process's cgroup is a sub-folder: its own
    quota and its ancestors' count, the smallest wins."""
    root = tmp_path / "v2"
    job = root / "system.slice" / "job.scope"
    job.mkdir(parents=True)
    (root / "system.slice" / "cpu.max").write_text("800000 100000\n")
    (job / "cpu.max").write_text("max 100000\n")
    own = "0::/system.slice/job.scope\n"
    assert threads._cgroup_cpus(root, own) == 8  # the slice's quota caps an unlimited child
    (job / "cpu.max").write_text("300000 100000\n")
    assert threads._cgroup_cpus(root, own) == 3
    assert threads._cgroup_cpus(root, "0::/elsewhere\n") is None  # a folder that is not there, no quota above
    v1 = tmp_path / "v1"
    (v1 / "cpu" / "batch" / "42").mkdir(parents=True)
    (v1 / "cpu" / "batch" / "cpu.cfs_quota_us").write_text("250000\n")
    (v1 / "cpu" / "batch" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads._cgroup_cpus(v1, "4:cpu,cpuacct:/batch/42\n1:memory:/x\n") == 3


def test_trainer_caps_threads_only_while_fit_runs(tmp_path, monkeypatch):
    """The pool is process-wide: fit() sets it beside its workers and puts the old size back after."""
    from _engine_fixtures import NoisyDataset, TinyNet, step_fn
    from beit.engine import TrainConfig, Trainer
    from beit.engine import trainer as T

    before = torch.get_num_threads()
    seen: list[int] = []

    def cap(device, workers):
        torch.set_num_threads(1)
        return 1

    def probe(model, batch):
        seen.append(torch.get_num_threads())
        return step_fn(model, batch)

    monkeypatch.setattr(T, "cap_intra_op_threads", cap)
    cfg = TrainConfig(output_dir=str(tmp_path), epochs=1, batch_size=8, num_workers=0, lr=1e-2, warmup_steps=1)
    t = Trainer(TinyNet(), NoisyDataset(16), probe, cfg)
    t.fit()
    assert set(seen) == {1} and t.host_threads == 1 and torch.get_num_threads() == before


def test_loader_workers_capped_at_the_cpus_of_this_process(monkeypatch, caplog):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with caplog.at_level("INFO", logger="beit"):
        assert threads.loader_workers(12) == 2
        assert threads.loader_workers(2) == 2 and threads.loader_workers(0) == 0  # within the cores: as asked
        assert threads.loader_workers(8, "eval_workers", say=False) == 2
    assert [r.getMessage() for r in caplog.records] == ["train.num_workers=12 but this process may use 2 CPUs: 2 workers"]
    caplog.clear()
    monkeypatch.setattr(threads, "usable_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: the host's CPUs shared by its ranks
    with caplog.at_level("INFO", logger="beit"):
        assert threads.loader_workers(14) == 4 and threads.loader_workers(3) == 3
    assert [r.getMessage() for r in caplog.records] == [
        "train.num_workers=14 but this process may use 4 CPUs (16 on this host over 4 local ranks): 4 workers"]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # more ranks than CPUs: still one worker each
    assert threads.loader_workers(14) == 1


def test_trainer_loader_uses_the_capped_worker_count_without_torchs_warning(tmp_path, monkeypatch, caplog):
    import warnings

    from _engine_fixtures import NoisyDataset, TinyNet, step_fn
    from beit.engine import TrainConfig, Trainer
    from beit.engine import trainer as T

    monkeypatch.setattr(threads, "usable_cores", lambda: 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    made: list[int] = []
    real = T.DataLoader

    def loader(*a, **kw):
        made.append(kw["num_workers"])
        return real(*a, **{**kw, "num_workers": 0, "persistent_workers": False})  # no processes in the test

    monkeypatch.setattr(T, "DataLoader", loader)
    cfg = TrainConfig(output_dir=str(tmp_path), epochs=1, batch_size=8, num_workers=12, lr=1e-2, warmup_steps=1)
    with caplog.at_level("INFO", logger="beit"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(TinyNet(), NoisyDataset(16), step_fn, cfg).fit()
    assert made and set(made) == {1}
    said = (tmp_path / "log.txt").read_text()  # the run's log (its logger does not propagate to caplog's)
    assert said.count("train.num_workers=12 but this process may use 1 CPU: 1 worker\n") == 1, said
    assert not [w for w in caught if "worker processes in total" in str(w.message)]
