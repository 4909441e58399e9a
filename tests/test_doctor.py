"""`lfw doctor`: one line per check, each failing one saying what to do. The GPU answers are faked
here (this machine has no GPU); `lfw doctor` itself runs for real on the CPU."""

from __future__ import annotations

import pytest

from conftest import lfw
from wrapper import doctor
from wrapper.doctor import Check

ORDER = ["gpu", "cuda", "versions", "bf16", "qlora", "liger", "plan", "disk"]


def test_lfw_doctor_on_this_machine_one_line_each():
    r = lfw("doctor", timeout=300)
    lines = r.stdout.strip().splitlines()
    assert [line.split()[1] for line in lines] == ORDER, r.stdout
    for line in lines:
        assert line.split()[0] in ("ok", "warn", "FAIL", "info"), line
    if r.returncode == 0:
        assert "FAIL" not in r.stdout
    else:  # a failure says which checks, and each failing line says what to do
        assert r.returncode == 1 and "check(s) failed" in r.stderr
        assert all("->" in line for line in lines if line.startswith("FAIL"))


def test_a_check_line_carries_its_fix():
    assert Check("qlora", "fail", "boom", "pip install bitsandbytes").line() == \
        "FAIL  qlora     boom -> pip install bitsandbytes"
    assert Check("gpu", "ok", "1 x H100").line() == "ok    gpu       1 x H100"


def _probe(monkeypatch, found: dict, stopped: str | None = None, driver_cuda: str = "13.0"):
    monkeypatch.setattr(doctor, "run_probe", lambda timeout=0: (found, stopped))
    monkeypatch.setattr(doctor, "_driver_version", lambda: "580.1")
    monkeypatch.setattr(doctor, "_cuda_of_driver", lambda: driver_cuda)


def _torch(**kw):
    base = {"name": "torch", "ok": True, "detail": "", "cuda": True, "cuda_build": "13.0", "count": 1,
            "capability": "9.0", "gpu_name": "NVIDIA H100 80GB HBM3"}
    return base | kw


def by_name(checks):
    return {c.name: c for c in checks}


def test_everything_works(monkeypatch):
    _probe(monkeypatch, {"torch": _torch(), "bf16": {"ok": True, "detail": "ran", "supported": True},
                         "qlora": {"ok": True, "detail": "4-bit ran"}, "liger": {"ok": True, "detail": "liger ran"}})
    c = by_name(doctor.gpu_checks(True))
    assert [c[n].status for n in ("cuda", "bf16", "qlora", "liger")] == ["ok"] * 4
    assert "CUDA 13.0" in c["cuda"].detail and "H100" in c["bf16"].detail


def test_cpu_only_torch_on_a_gpu_machine_fails_with_the_fix(monkeypatch):
    _probe(monkeypatch, {"torch": _torch(cuda=False, cuda_build=None, count=0)})
    c = by_name(doctor.gpu_checks(True))
    assert c["cuda"].status == "fail" and "CUDA build of torch" in c["cuda"].fix
    assert all(c[n].status == "info" for n in ("bf16", "qlora", "liger"))


def test_missing_bitsandbytes_and_liger_are_warnings_with_pip_lines(monkeypatch):
    _probe(monkeypatch, {"torch": _torch(), "bf16": {"ok": True, "detail": "ran", "supported": True},
                         "qlora": {"ok": False, "detail": "bitsandbytes is not installed", "missing": True},
                         "liger": {"ok": False, "detail": "liger-kernel is not installed", "missing": True}})
    c = by_name(doctor.gpu_checks(True))
    assert c["qlora"].status == "warn" and "pip install bitsandbytes" in c["qlora"].fix
    assert c["liger"].status == "warn" and "pip install liger-kernel" in c["liger"].fix


def test_broken_kernels_fail_with_a_way_around(monkeypatch):
    _probe(monkeypatch, {"torch": _torch(), "bf16": {"ok": True, "detail": "ran", "supported": True},
                         "qlora": {"ok": False, "detail": "RuntimeError: no kernel image"},
                         "liger": {"ok": False, "detail": "CompilationError: triton"}})
    c = by_name(doctor.gpu_checks(True))
    assert c["qlora"].status == "fail" and "method: lora" in c["qlora"].fix
    assert c["liger"].status == "fail" and "enable_liger_kernel: false" in c["liger"].fix


def test_old_gpu_without_bf16_is_a_warning(monkeypatch):
    _probe(monkeypatch, {"torch": _torch(capability="7.5", gpu_name="Tesla T4"),
                         "bf16": {"ok": False, "detail": "ran", "supported": False},
                         "qlora": {"ok": True, "detail": "ran"}, "liger": {"ok": True, "detail": "ran"}})
    c = by_name(doctor.gpu_checks(True))
    assert c["bf16"].status == "warn" and "fp16" in c["bf16"].fix


def test_old_driver_is_a_warning(monkeypatch):
    _probe(monkeypatch, {"torch": _torch(cuda_build="13.0"), "bf16": {"ok": True, "detail": "ran", "supported": True},
                         "qlora": {"ok": True, "detail": "ran"}, "liger": {"ok": True, "detail": "ran"}},
           driver_cuda="12.4")
    c = by_name(doctor.gpu_checks(True))
    assert c["cuda"].status == "warn" and "update the driver" in c["cuda"].fix


def test_a_crashing_probe_is_reported_not_raised(monkeypatch):
    _probe(monkeypatch, {"torch": _torch(), "bf16": {"ok": True, "detail": "ran", "supported": True}},
           stopped="the check process died (exit -11)")
    c = by_name(doctor.gpu_checks(True))
    assert c["qlora"].status == "fail" and "died" in c["qlora"].detail
    assert c["liger"].status == "fail"


def test_the_real_probe_process_runs_here():
    found, stopped = doctor.run_probe(timeout=240)
    assert stopped is None, stopped
    assert found["torch"]["ok"] is True


def test_gpu_line_lists_gpus_and_free_memory(monkeypatch):
    from wrapper import device

    smi = "0, GPU-a, NVIDIA H100 80GB HBM3, 81559, 81079, 9.0\n1, GPU-b, NVIDIA H100 80GB HBM3, 81559, 2000, 9.0\n"
    monkeypatch.setattr(device, "query_nvidia_smi", lambda timeout=10.0: device.parse_nvidia_smi(smi))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    c = doctor.check_gpu()
    assert c.detail.startswith("2 x ") and "79.2 GiB free" in c.detail and "2.0 GiB free" in c.detail
    assert c.status == "warn" and "another process" in c.fix
    monkeypatch.setattr(device, "query_nvidia_smi", lambda timeout=10.0: None)
    assert "no NVIDIA GPU" in doctor.check_gpu().detail


@pytest.mark.parametrize("installed,status", [("0.9.5", "ok"), ("0.9.4", "warn"), (None, "fail")])
def test_versions_line(monkeypatch, installed, status):
    real = doctor.version
    monkeypatch.setattr(doctor, "version", lambda n: installed if n == "llamafactory" else real(n))
    c = doctor.check_versions()
    assert c.status == status
    assert "torch" in c.detail
