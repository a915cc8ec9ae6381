"""train.run.precision: "auto" mixed precision follows the device; the CPU probe is cached per process and on disk."""

import json

import pytest
import torch

from train.run import precision


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each test: its own disk cache folder, and no probe result kept from another test."""
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))
    probe = precision.probe_cpu_bf16_speedup  # the real one: a test may patch the module's name
    probe.cache_clear()
    yield
    probe.cache_clear()


@pytest.fixture
def counted_measure(monkeypatch):
    """The timer replaced by one that counts its calls and reports bf16 2.5x fp32."""
    calls = []

    def measure():
        calls.append(1)
        return {"speedup": 2.5, "fp32_s": 0.05, "bf16_s": 0.02, "stage": "full"}

    monkeypatch.setattr(precision, "_measure", measure)
    return calls


def no_probe():
    raise AssertionError("the probe ran for an explicit value")


@pytest.mark.parametrize("value", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_explicit_values_pass_through(value, device, monkeypatch):
    monkeypatch.setattr(precision, "probe_cpu_bf16_speedup", no_probe)
    logged = []
    assert precision.resolve_mixed_precision(value, torch.device(device), log=logged.append) == value
    assert logged == []  # only "auto" is logged


@pytest.mark.parametrize("speedup, expected", [(0.1, "fp32"), (1.0, "fp32"), (1.2, "bf16"), (3.0, "bf16")])
def test_auto_on_cpu_follows_the_probe(speedup, expected, monkeypatch):
    monkeypatch.setattr(precision, "probe_cpu_bf16_speedup", lambda: speedup)
    logged = []
    assert precision.resolve_mixed_precision("auto", torch.device("cpu"), log=logged.append) == expected
    assert len(logged) == 1 and logged[0].startswith(f"mixed_precision auto -> {expected} (CPU probe: bf16 {speedup:.2f}x")
    assert precision.cpu_model() in logged[0]


def test_auto_on_cpu_with_the_real_probe():
    logged = []
    choice = precision.resolve_mixed_precision("auto", "cpu", log=logged.append)
    speedup = precision.probe_cpu_bf16_speedup()
    assert speedup > 0
    assert choice == ("bf16" if speedup >= precision.BF16_MIN_SPEEDUP else "fp32")
    assert logged and f"auto -> {choice}" in logged[0]


def test_probe_leaves_the_process_as_it_was(counted_measure, monkeypatch):
    monkeypatch.undo()  # the real timer
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    precision._measure()
    assert torch.equal(torch.rand(3), expected)  # the global random stream is untouched
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("gpu_bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda(gpu_bf16, expected, monkeypatch):
    monkeypatch.setattr(precision, "probe_cpu_bf16_speedup", no_probe)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")
    logged = []
    assert precision.resolve_mixed_precision("auto", torch.device("cuda", 0), log=logged.append) == expected
    assert logged == [f"mixed_precision auto -> {expected} (CUDA Fake GPU: bf16 {'supported' if gpu_bf16 else 'not supported'})"]


@pytest.mark.parametrize("bad", ["no", "bfloat16", "", "FP32", False, None])
def test_bad_values_name_the_allowed_ones(bad):
    with pytest.raises(ValueError) as e:
        precision.resolve_mixed_precision(bad, torch.device("cpu"))
    for allowed in ("auto", "fp32", "bf16", "fp16"):
        assert allowed in str(e.value)


def test_probe_runs_once_per_process(counted_measure):
    assert precision.probe_cpu_bf16_speedup() == 2.5
    assert precision.probe_cpu_bf16_speedup() == 2.5
    precision.resolve_mixed_precision("auto", torch.device("cpu"), log=lambda _: None)
    assert len(counted_measure) == 1


def test_disk_cache_is_used_by_the_next_process_and_keyed_by_cpu_model(counted_measure, tmp_path, monkeypatch):
    assert precision.probe_cpu_bf16_speedup() == 2.5
    path = tmp_path / "cache" / "precision.json"
    assert precision.cache_path() == path
    entries = json.loads(path.read_text())
    [(key, entry)] = entries.items()
    assert precision.cpu_model() in key and torch.__version__ in key
    assert entry["speedup"] == 2.5 and "measured" in entry
    assert not list(path.parent.glob("*.tmp"))  # the temporary file was renamed over the cache

    precision.probe_cpu_bf16_speedup.cache_clear()  # as a new process
    assert precision.probe_cpu_bf16_speedup() == 2.5
    assert len(counted_measure) == 1  # read from disk

    # another CPU model: probed again, kept beside the first
    monkeypatch.setattr(precision, "_cpuinfo", lambda: ("Other CPU 9000", frozenset({"avx2"})))
    precision.probe_cpu_bf16_speedup.cache_clear()
    logged = []
    precision.resolve_mixed_precision("auto", torch.device("cpu"), log=logged.append)
    assert len(counted_measure) == 2
    assert "on Other CPU 9000" in logged[0]
    keys = set(json.loads(path.read_text()))
    assert key in keys and "Other CPU 9000 [avx2] torch " + torch.__version__ in keys


def test_a_broken_or_unwritable_cache_is_no_error(counted_measure, tmp_path, monkeypatch):
    path = tmp_path / "cache" / "precision.json"
    path.parent.mkdir()
    path.write_text("{not json")
    assert precision.probe_cpu_bf16_speedup() == 2.5
    assert precision.cache_key() in json.loads(path.read_text())  # rewritten whole

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LDM_CACHE", str(blocker / "sub"))  # a folder that cannot be made
    precision.probe_cpu_bf16_speedup.cache_clear()
    assert precision.probe_cpu_bf16_speedup() == 2.5
    assert len(counted_measure) == 2


def fake_trials(monkeypatch, fp32_s, bf16_s):
    """_trial replaced by fixed times; returns the list of (workload size, bf16) trials run."""
    trials = []

    def trial(step, bf16):
        trials.append(("small" if step.small else "full", bf16))
        return bf16_s if bf16 else fp32_s

    real = precision._workload

    def workload(batch, side, n, generator):
        step = real(batch, side, n, generator)
        step.small = batch == 1
        return step

    monkeypatch.setattr(precision, "_trial", trial)
    monkeypatch.setattr(precision, "_workload", workload)
    return trials


def test_hopeless_bf16_stops_at_the_screen(monkeypatch):
    trials = fake_trials(monkeypatch, fp32_s=0.002, bf16_s=0.3)  # 150x slower
    result = precision._measure()
    assert result["stage"] == "screen" and result["speedup"] == pytest.approx(0.002 / 0.3)
    assert trials.count(("small", True)) == 2 and not [t for t in trials if t[0] == "full"]


def test_fast_bf16_is_timed_on_the_full_workload(monkeypatch):
    trials = fake_trials(monkeypatch, fp32_s=0.04, bf16_s=0.02)
    result = precision._measure()
    assert result["stage"] == "full" and result["speedup"] == pytest.approx(2.0)
    assert trials.count(("full", True)) == 1 + precision.REPEATS  # one untimed, then the repeats
