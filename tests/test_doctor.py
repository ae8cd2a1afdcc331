"""`rwkv-convert doctor`: what this machine can do, each missing piece with its fix."""

from __future__ import annotations

import importlib.util
import json

import torch

from rwkv_convert import doctor
from rwkv_convert.bundled import trained_model

from .test_cli import cli


def test_doctor_reports_this_machine_in_lines_and_json():
    result = cli("doctor", str(trained_model("v7")))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    gpu = [line for line in lines if " GPU " in f" {line} "]
    assert len(gpu) == 1
    if not torch.cuda.is_available():  # this machine and CI: one line says so
        assert gpu[0].startswith("--") and "no CUDA GPU" in gpu[0]
    for name in ("torch", "CPU kernels", "onnxruntime", "llama-cpp-python", "rwkv", "memory", "disk"):
        assert any(line[4:].startswith(name + " ") for line in lines), name
    assert sum("rwkv7-stdlib-L3-C256.pth" in line for line in lines) == 1  # the memory line names it
    checks = json.loads(cli("doctor", "--json").stdout)
    assert {c["name"] for c in checks} >= {"torch", "GPU", "CPU kernels", "onnxruntime", "memory", "disk"}
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in checks)
    assert next(c for c in checks if c["name"] == "CPU kernels")["status"] == "ok"  # built and self-checked here


def test_a_missing_runtime_comes_with_the_command_that_installs_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    llama = next(c for c in doctor.run_checks() if c.name == "llama-cpp-python")
    assert llama.status == "missing" and llama.fix.startswith("pip install llama-cpp-python==0.3.36")


def test_kernels_turned_off_are_reported(monkeypatch):
    monkeypatch.setenv("RWKV_CONVERT_NO_NATIVE", "1")
    kernels = next(c for c in doctor.run_checks() if c.name == "CPU kernels")
    assert kernels.status == "missing" and "RWKV_CONVERT_NO_NATIVE" in kernels.fix


def test_too_little_memory_for_a_checkpoint_is_a_problem_with_a_fix(monkeypatch, tmp_path):
    big = tmp_path / "big.pth"
    with open(big, "wb") as f:
        f.truncate(10 ** 9)  # sparse: its size is what counts
    monkeypatch.setattr(doctor, "memory_available", lambda: 10 ** 9)
    memory = next(c for c in doctor.run_checks(big, tmp_path) if c.name == "memory")
    assert memory.status == "problem" and "big.pth" in memory.detail and memory.fix
