"""Defects of the GPU path, each caught on the CPU: how a run resumes (RNG states, precision),
how data-parallel slices split a batch, when an fp16 run that diverged stops."""
import types

import pytest
import torch

import samlib.dist
import samlib.rundir
from samlib.config import resolve
from samlib.data import split_data, synthetic_cifar10
from samlib.errors import SamlibError
from samlib.io import load_checkpoint, save_checkpoint
from samlib.run import train
from samlib.rundir import RunDir
from samlib.train import NonFiniteLossError, Trainer

TINY = dict(widths=(4, 8, 8), blocks=(1, 1, 1), epochs=2, batch_size=32, val_size=32, train_subset=None,
            test_subset=None, train_eval_size=32)


@pytest.fixture(scope="module")
def dataset():
    return synthetic_cifar10(n_train=160, n_test=32, seed=3)


def _half_run(tmp_path, dataset):
    cfg = resolve("final", "smoke", **TINY)
    run = train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False, stop_after=1)
    return cfg, RunDir(run)


def test_a_resume_reads_the_checkpoint_on_the_cpu_whatever_device_trains(tmp_path, dataset, monkeypatch):
    """torch.Generator.set_state takes CPU ByteTensors only: map_location=<the GPU> broke every
    resume after a Colab disconnect.  The state is read on the CPU; each part moves itself."""
    cfg, run = _half_run(tmp_path, dataset)
    seen = []
    real = samlib.rundir.load_checkpoint
    monkeypatch.setattr(samlib.rundir, "load_checkpoint", lambda path, map_location="cpu", **kw:
                        (path.name == "last.pt" and seen.append(map_location)) or real(path, map_location, **kw))
    train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False)
    assert [str(d) for d in seen] == ["cpu"]
    state = load_checkpoint(run / "last.pt")
    assert state["rng"]["aug"].device.type == "cpu" and state["rng"]["aug"].dtype == torch.uint8


def _untimed(state):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in state["metrics"]]


def test_a_run_resumes_in_the_precision_it_started_in(tmp_path, dataset, monkeypatch, one_thread):
    """Started in fp32 on a CPU without bf16, resumed where amp="auto" would pick bf16: the run
    goes on in fp32 (training and evaluation) and ends exactly as the uninterrupted run."""
    import samlib.device as dev
    cfg = resolve("final", "smoke", **TINY)
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    whole = load_checkpoint(train(cfg, dataset=dataset, out=tmp_path / "whole", device="cpu",
                                  progress=False) / "last.pt")
    train(cfg, dataset=dataset, out=tmp_path / "split", device="cpu", progress=False, stop_after=1)
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)     # another machine
    resumed = load_checkpoint(train(cfg, dataset=dataset, out=tmp_path / "split", device="cpu",
                                    progress=False) / "last.pt")
    assert whole["precision"] == resumed["precision"] == "fp32"
    assert _untimed(resumed) == _untimed(whole)
    for k, v in whole["model"].items():
        assert torch.equal(v, resumed["model"][k]), k


@pytest.mark.parametrize("amp", ["auto", "off"])
def test_a_run_never_switches_to_a_precision_the_device_lacks(tmp_path, dataset, monkeypatch, amp):
    """A bf16 checkpoint on a CPU without native bf16 (emulated bf16 is many times slower than
    fp32), or any other precision under amp="off": one clear error, the checkpoint untouched."""
    import samlib.device as dev
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    cfg = resolve("final", "smoke", amp=amp, **TINY)
    run = RunDir(train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False, stop_after=1))
    state = load_checkpoint(run / "last.pt")
    state.pop("_path")
    save_checkpoint(dict(state, precision="bf16"), run / "last.pt", keep_previous=False)
    before = (run / "last.pt").read_bytes()
    with pytest.raises(SamlibError, match="was trained in bf16, but this device would continue in fp32 "
                                          r"\(bf16 is not native here\)"):
        train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False)
    assert (run / "last.pt").read_bytes() == before
    old = {k: v for k, v in state.items() if k not in ("precision", "format")}   # before it was kept
    save_checkpoint(old, run / "last.pt", keep_previous=False)
    assert (train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False) / "final.json").exists()


@pytest.mark.parametrize("precision, device, native_cpu_bf16, expected", [
    ("fp32", "cpu", False, True), ("fp32", "cpu", True, True),
    ("bf16", "cpu", False, False), ("bf16", "cpu", True, True),
    ("fp16", "cpu", True, False)])
def test_which_precisions_a_device_runs_natively(monkeypatch, precision, device, native_cpu_bf16, expected):
    import samlib.device as dev
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native_cpu_bf16)
    assert dev.runs_natively(precision, torch.device(device)) is expected


@pytest.mark.parametrize("major, precision, expected", [
    (7, "fp16", True), (7, "bf16", False), (8, "bf16", True), (8, "fp16", True), (9, "fp32", True)])
def test_which_precisions_a_gpu_runs_natively(monkeypatch, major, precision, expected):
    import samlib.device as dev
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (major, 0))
    assert dev.runs_natively(precision, torch.device("cuda:0")) is expected


@pytest.mark.parametrize("world, ok", [(2, True), (4, True), (3, False), (64, True), (128, False)])
def test_data_parallel_batches_split_evenly_or_the_setting_is_refused(dataset, monkeypatch, world, ok):
    monkeypatch.setattr(samlib.dist, "world_size", lambda: world)
    monkeypatch.setattr(samlib.dist, "wrap", lambda model, device: model)   # no process group here
    cfg = resolve("final", "smoke", **dict(TINY, batch_size=64))
    if ok:
        Trainer(cfg, split_data(cfg, dataset), torch.device("cpu"))
    else:
        with pytest.raises(SamlibError, match=f"batch_size 64 does not split evenly over {world} processes"):
            Trainer(cfg, split_data(cfg, dataset), torch.device("cpu"))


def test_an_fp16_run_whose_every_step_the_scaler_skipped_stops(dataset):
    """Skipped steps (inf/NaN gradients under fp16 loss scaling) are counted; an epoch of only
    skipped steps stops the run, a NaN loss with some steps trained does not."""
    cfg = resolve("final", "smoke", **TINY)
    trainer = Trainer(cfg, split_data(cfg, dataset), torch.device("cpu"))
    trainer.scaler = types.SimpleNamespace(is_enabled=lambda: True, get_scale=lambda: 0.5)   # as on an fp16 GPU
    steps = trainer.steps_per_epoch
    trainer.check_finite({"epoch": 3, "nonfinite_steps": steps, "skipped_steps": steps - 1,
                          "first_nonfinite_step": 1}, None)
    with pytest.raises(NonFiniteLossError, match=f"every step of epoch 3 overflowed in fp16: the loss scaler "
                                                 f"skipped all {steps} steps \\(loss scale now 0.5\\)"):
        trainer.check_finite({"epoch": 3, "nonfinite_steps": 0, "skipped_steps": steps,
                              "first_nonfinite_step": None}, None)


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"),
                                                  ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_precision_follows_the_chosen_gpus_native_support(monkeypatch, capability, expected):
    """T4 (7.5) and V100 (7.0) train in fp16 + GradScaler even though torch reports bf16 as
    supported there (emulated); A100/L4 (8.x) and H100 (9.0) in bf16.  The chosen GPU is asked,
    not the current one; the CPU stays fp32 and amp="off" is fp32 everywhere."""
    import samlib.device as dev

    asked = []
    capabilities = {0: (6, 1), 1: capability}                    # GPU 0 is another, older card
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: asked.append(i) or capabilities[i])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # as on a T4
    assert dev.precision_for("auto", torch.device("cuda:1")) == expected and asked == [1]
    assert dev.precision_for("off", torch.device("cuda:1")) == "fp32"
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    assert dev.precision_for("auto", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("native", [True, False])
def test_cpu_amp_is_bf16_exactly_when_the_cpu_has_native_bf16(monkeypatch, native):
    import samlib.device as dev

    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native)
    assert dev.precision_for("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    assert dev.precision_for("off", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("flags, native", [({"avx512_bf16": True, "avx2": True}, True), ({"amx_bf16": True}, True),
                                           ({"avx512_bf16": False, "amx_bf16": False, "avx512_f": True}, False),
                                           ({}, False)])
def test_native_bf16_detection_reads_torchs_cpu_capabilities(monkeypatch, flags, native):
    import samlib.device as dev

    monkeypatch.setattr(torch._C, "_cpu", types.SimpleNamespace(_get_cpu_capability=lambda: flags), raising=False)
    dev.cpu_has_native_bf16.cache_clear()
    try:
        assert dev.cpu_has_native_bf16() is native
    finally:
        dev.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("text, native", [
    ("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n", False),      # AVX-512 without its bf16 extension
    ("Features\t: fp asimd bf16\n", False),                               # Arm: not detected, stays fp32
    (None, False)])                                                          # no /proc/cpuinfo (macOS, Windows)
def test_without_torchs_detection_the_kernels_flags_decide(monkeypatch, tmp_path, text, native):
    import samlib.device as dev

    monkeypatch.setattr(torch._C, "_cpu", types.SimpleNamespace(), raising=False)   # an older torch
    path = tmp_path / "cpuinfo"
    if text is not None:
        path.write_text(text)
    monkeypatch.setattr(dev, "CPUINFO", str(path))
    dev.cpu_has_native_bf16.cache_clear()
    try:
        assert dev.cpu_has_native_bf16() is native
    finally:
        dev.cpu_has_native_bf16.cache_clear()


def _expected_cpu_precision() -> str:
    from samlib.device import precision_for
    return precision_for("auto", torch.device("cpu"))


def test_cpu_runs_repeat_bit_for_bit_at_the_cpus_amp_precision(tmp_path, dataset, one_thread):
    """Same seed, machine and thread count: the same metrics and weights, in bf16 on a CPU with
    native bf16 (fp32 elsewhere); amp="off" trains in fp32, and in bf16 that is another run."""
    cfg = resolve("final", "smoke", **TINY)
    runs = [train(cfg, dataset=dataset, out=tmp_path / name, device="cpu", progress=False) for name in "ab"]
    states = [load_checkpoint(r / "last.pt") for r in runs]
    assert {s["precision"] for s in states} == {_expected_cpu_precision()}
    untimed = [[{k: v for k, v in row.items() if k != "seconds"} for row in s["metrics"]] for s in states]
    assert untimed[0] == untimed[1]
    for k, v in states[0]["model"].items():
        assert torch.equal(v, states[1]["model"][k]), k
    fp32 = train(resolve("final", "smoke", amp="off", **TINY), dataset=dataset, out=tmp_path / "fp32",
                 device="cpu", progress=False)
    fp32_state = load_checkpoint(fp32 / "last.pt")
    assert fp32_state["precision"] == "fp32"
    differs = any(not torch.equal(v, fp32_state["model"][k]) for k, v in states[0]["model"].items())
    assert differs == (_expected_cpu_precision() == "bf16")


def test_a_run_started_on_a_gpu_does_not_resume_on_the_cpu_with_a_raw_rng_error(tmp_path, dataset):
    """A CUDA generator's state (16 bytes, Philox) cannot seed the CPU's (Mersenne Twister):
    with the same precision on both (fp32, or bf16 on a CPU with native bf16) the precision
    check passes, so the random stream is checked itself, in one clear error."""
    cfg, run = _half_run(tmp_path, dataset)
    state = load_checkpoint(run / "last.pt")
    state.pop("_path")
    state["rng"]["aug"] = torch.zeros(16, dtype=torch.uint8)       # what a CUDA generator saves
    save_checkpoint(state, run / "last.pt", keep_previous=False)
    with pytest.raises(SamlibError, match="random stream of another kind of device than cpu"):
        train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False)


@pytest.mark.parametrize("text, model", [
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t: fpu avx2\n", "AMD EPYC"),
    ("model name\t: Intel(R) Xeon(R)   Platinum 8481C CPU @ 2.70GHz\n", "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"),
    ("Features\t: fp asimd\n", ""),                                            # no model name line (Arm)
    (None, ""),                                                                # no /proc/cpuinfo
    (b"model name\t: \xff\xfe\n", "")])                                        # not text: no name, no error
def test_the_cpu_model_in_provenance_comes_from_the_kernels_cpuinfo(monkeypatch, tmp_path, text, model):
    import samlib.device as dev
    from samlib.rundir import describe_device

    path = tmp_path / "cpuinfo"
    if isinstance(text, str):
        path.write_text(text)
    elif text is not None:
        path.write_bytes(text)
    monkeypatch.setattr(dev, "CPUINFO", str(path))
    dev.cpu_model.cache_clear()
    try:
        assert dev.cpu_model() == model
        assert describe_device(torch.device("cpu")).startswith(f"cpu ({model}, " if model else "cpu (")
    finally:
        dev.cpu_model.cache_clear()
