"""Chapter 00: devices, seeds, the latency harness, model sizes and result files."""
import json
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from recbook import core
from recbook.core import (BenchResult, LatencyStats, ModelSize, atomic_write_text, get_device, load_results,
                          measure_latencies, measure_latency, median_interval, model_size, pick_size, save_results, seed_everything)


def test_device_override_and_errors(monkeypatch):
    monkeypatch.setenv("RECBOOK_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    monkeypatch.delenv("RECBOOK_DEVICE")
    assert get_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            get_device("cuda")
        monkeypatch.setenv("RECBOOK_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            get_device()


def test_seed_everything_repeats_streams():
    seed_everything(3)
    a = torch.randn(5)
    seed_everything(3)
    assert torch.equal(a, torch.randn(5))


def test_pick_size_follows_in_test(monkeypatch):
    monkeypatch.setenv("IN_TEST", "1")
    assert pick_size("small", "big") == "small"
    monkeypatch.delenv("IN_TEST")
    assert pick_size("small", "big") == "big"


class FakeClock:
    "Each timed call moves this clock forward by a set number of milliseconds."
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, ms):
        self.now += ms / 1e3


def test_measure_latency_counts_calls_and_orders_stats():
    clock, calls = FakeClock(), []
    durations = [9, 9, 2, 3, 5, 4, 8, 6]  # ms: two warm-up calls, then six timed ones

    def fn():
        clock.advance(durations[len(calls)]); calls.append(1)
    stats = measure_latency(fn, batch_size=4, warmup=2, repeats=6, device="cpu", clock=clock)
    assert len(calls) == 8
    assert stats.repeats == 6 and stats.batch_size == 4 and stats.device == "cpu"
    timed = np.array(durations[2:], dtype=float)
    assert stats.min_ms == pytest.approx(2.0) and stats.p50_ms == pytest.approx(np.median(timed))
    assert stats.p95_ms == pytest.approx(np.percentile(timed, 95)) and stats.std_ms == pytest.approx(timed.std(ddof=1))
    assert stats.throughput == pytest.approx(4 / (stats.p50_ms / 1e3))
    assert stats.threads == torch.get_num_threads()


@given(st.lists(st.floats(0.01, 1e3), min_size=1, max_size=80))
@settings(max_examples=60, deadline=None)
def test_median_interval_holds_the_median_and_matches_scipy(ms):
    from scipy.stats import quantile_test
    low, high = median_interval(ms)
    assert min(ms) <= low <= np.median(ms) <= high <= max(ms)
    if len(ms) >= 6:
        reference = quantile_test(ms, p=0.5).confidence_interval(0.95)
        assert (low, high) == (reference.low, reference.high)
    else:  # no pair of order statistics covers 95%: the whole range
        assert (low, high) == (min(ms), max(ms))


def test_median_interval_covers_the_true_median_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = [low <= 1.0 <= high for low, high in (median_interval(rng.lognormal(0.0, 1.0, 40)) for _ in range(2000))]
    assert 0.93 <= np.mean(hits) <= 0.99  # lognormal(0, 1) has median 1; the interval is conservative


def test_measure_latency_runs_without_autograd():
    seen = []
    measure_latency(lambda: seen.append(torch.is_inference_mode_enabled()), warmup=0, repeats=2, device="cpu")
    assert seen == [True, True]


def test_measure_latency_rejects_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(lambda: None, repeats=0, device="cpu")


@given(st.lists(st.floats(0.0001, 10.0), min_size=1, max_size=50), st.integers(1, 512))
def test_latency_stats_invariants(seconds, batch):
    s = LatencyStats.from_samples(seconds, batch, torch.device("cpu"))
    assert s.min_ms <= s.p50_ms <= s.p95_ms + 1e-9
    assert s.min_ms <= s.mean_ms + 1e-9
    assert s.std_ms >= 0


def test_model_size_counts_parameters_buffers_and_disk():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.BatchNorm1d(20))
    size = model_size(model)
    params = 10 * 20 + 20 + 20 + 20
    assert size.parameters == params
    buffers = 20 + 20 + 1  # running mean, running var, num_batches_tracked (int64)
    assert size.memory_bytes == params * 4 + 40 * 4 + 8
    assert size.disk_bytes >= size.memory_bytes
    assert size.disk_mb == size.disk_bytes / 2**20


def test_model_size_of_dynamically_quantized_model_counts_packed_weights():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256))
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    fp32, int8 = model_size(model), model_size(quantized)
    assert int8.disk_bytes < fp32.disk_bytes / 2.5


def test_results_roundtrip_and_machine(tmp_path):
    stats = LatencyStats.from_samples([0.01, 0.02, 0.03], 8, torch.device("cpu"))
    rows = [BenchResult("a", {"ndcg@10": 0.4}, stats, ModelSize(3, 12, 100), {"note": "x"}), BenchResult("b")]
    path = save_results(tmp_path / "deep" / "r.json", rows, chapter="test")
    back, rest = load_results(path)
    assert back == rows
    assert rest["chapter"] == "test" and rest["machine"]["device"]
    assert json.loads(path.read_text())["results"][0]["latency"]["p50_ms"] == pytest.approx(20.0)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(core.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"


def test_data_dir_errors_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("RECBOOK_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="RECBOOK_DATA"):
        core.data_dir()


def test_autocast_is_a_no_op_on_cpu_and_half_on_cuda():
    from recbook.core import autocast, autocast_dtype
    assert autocast_dtype(torch.device("cpu")) is None
    with autocast(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    if torch.cuda.is_available():
        assert autocast_dtype(torch.device("cuda")) in (torch.float16, torch.bfloat16)


def test_machine_info_names_the_machine():
    from recbook.core import machine_info
    info = machine_info("cpu")
    assert info["device"] == "cpu" and info["cpu_count"] >= 1 and info["torch"] == torch.__version__
    assert {"platform", "processor", "torch_threads", "transformers", "recbook"} <= set(info)


def test_model_size_counts_quantized_weights():
    import warnings
    from torch.ao.quantization import float_qparams_weight_only_qconfig, default_dynamic_qconfig, quantize_dynamic
    from recbook.core import model_size
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = quantize_dynamic(model, {torch.nn.Linear: default_dynamic_qconfig,
                                         torch.nn.Embedding: float_qparams_weight_only_qconfig}, dtype=torch.qint8)
    assert model_size(model).parameters == model_size(small).parameters == 10 * 4 + 4 * 3 + 3


@given(n=st.integers(1, 5), warmup=st.integers(0, 3), repeats=st.integers(1, 7))
@settings(max_examples=25, deadline=None)
def test_measure_latencies_interleaves_with_a_rotating_start(n, warmup, repeats):
    calls = []
    fns = {f"f{i}": (lambda i=i: calls.append(i)) for i in range(n)}
    stats = measure_latencies(fns, warmup=warmup, repeats=repeats, device="cpu")
    assert [s.repeats for s in stats.values()] == [repeats] * n and list(stats) == list(fns)
    assert calls[: warmup * n] == list(range(n)) * warmup  # warm-up rounds in order
    timed = calls[warmup * n:]
    for r in range(repeats):  # each timed round calls every function once, starting at r mod n
        assert timed[r * n:(r + 1) * n] == [(r + j) % n for j in range(n)]


def test_measure_latencies_rejects_nothing_to_time():
    with pytest.raises(ValueError, match="Need functions"):
        measure_latencies({}, device="cpu")
