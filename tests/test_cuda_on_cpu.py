"""The CUDA kernels' own source compiled for the CPU (rwkv_convert/cuda/on_cpu.py, cuda_on_cpu.h): every kernel
against the torch path on random inputs of several shapes; broken copies of the kernels (an off-by-one, a removed
__syncthreads, a barrier some threads skip, a hang) that must fail; and the self-test that turns corrupted kernels
off. The seed is fixed and printed (pytest's header, every message); RWKV_CONVERT_TEST_SEED=<n> runs another."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rwkv_convert
from rwkv_convert.arch import v4, v5, v7
from rwkv_convert.cuda import on_cpu, ops, selftest
from rwkv_convert.fixtures import fixture_path
from rwkv_convert.runner import Model

from .conftest import KERNEL_TEST_SEED, tokens_for

SEED = KERNEL_TEST_SEED
BOUND = 1e-4  # fp32 sums in another order, no fast math in this build
CUDA_DIR = Path(on_cpu.__file__).parent
SOURCES = (on_cpu.SOURCE_NAME, *on_cpu.HEADER_NAMES)


@pytest.fixture(scope="module")
def kernels():
    ext = on_cpu.build()
    ext.set_schedule_seed(SEED)
    return ext


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(SEED)


def rand(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def assert_close(got, want, what):
    for a, b in zip(got, want, strict=True):
        error = selftest.relative_error(a, b)
        assert error <= BOUND, f"{what}: differs by {error:.2e} (seed {SEED})"


@pytest.mark.parametrize("T", [1, 2, 17])
@pytest.mark.parametrize("C", [1, 130, 300])
def test_wkv4(kernels, gen, T, C):
    w, u = -torch.exp(rand(gen, C)), rand(gen, C)
    k, v = rand(gen, T, C), rand(gen, T, C)
    state = [rand(gen, C), rand(gen, C).abs() + 0.1, rand(gen, C)]
    before = [s.clone() for s in state]
    assert_close(ops.wkv4(w, u, k, v, *state, ext=kernels), v4.wkv4(w, u, k, v, *state), f"wkv4 T={T} C={C}")
    assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))  # inputs untouched


@pytest.mark.parametrize("T", [1, 2, 17])
@pytest.mark.parametrize("N", ops.HEAD_SIZES)
@pytest.mark.parametrize("per_token", [False, True])
def test_wkv5(kernels, gen, T, N, per_token):
    H = 3
    r, k, v = rand(gen, T, H, N), rand(gen, T, H, N), rand(gen, T, H, N)
    w = torch.rand(T, H, N, 1, generator=gen) if per_token else torch.rand(H, N, 1, generator=gen)
    u, s = rand(gen, H, N, 1), rand(gen, H, N, N, scale=0.3)
    before = s.clone()
    assert_close(ops.wkv5(r, k, v, w, u, s, ext=kernels), v5.wkv(r, k, v, w, u, s),
                 f"wkv5 T={T} N={N} per_token={per_token}")
    assert torch.equal(s, before)


@pytest.mark.parametrize("T", [1, 2, 17])
@pytest.mark.parametrize("N", ops.HEAD_SIZES)
def test_wkv7(kernels, gen, T, N):
    H = 3
    r, k, v = rand(gen, T, H, N), rand(gen, T, H, N), rand(gen, T, H, N)
    w = torch.exp(-0.6 * torch.rand(T, H, N, generator=gen))
    kk = torch.nn.functional.normalize(rand(gen, T, H, N), dim=-1)
    a, s = torch.rand(T, H, N, generator=gen), rand(gen, H, N, N, scale=0.3)
    before = s.clone()
    assert_close(ops.wkv7(r, w, k, v, kk, a, s, ext=kernels), v7.wkv7(r, w, k, v, kk, a, s), f"wkv7 T={T} N={N}")
    assert torch.equal(s, before)


def wkv7_inputs(gen, T, H, N, decay=None):
    r, k, v = rand(gen, T, H, N), rand(gen, T, H, N), rand(gen, T, H, N)
    # RWKV-7's own range of decays, (0.545, 1), down to its strongest, unless a decay is given
    w = torch.exp(-0.6065 * torch.rand(T, H, N, generator=gen)) if decay is None else torch.full((T, H, N), decay)
    kk = torch.nn.functional.normalize(rand(gen, T, H, N), dim=-1)
    return r, w, k, v, kk, torch.rand(T, H, N, generator=gen), rand(gen, H, N, N, scale=0.3)


@pytest.mark.parametrize("T", [1, 16, 31, 32, 33, 100])
@pytest.mark.parametrize("N", ops.HEAD_SIZES)
def test_wkv7_chunked(kernels, gen, T, N):
    """The prefill kernel against the token-by-token torch recurrence: whole and partial chunks (32 tokens; 16 at
    head size 128), and ops.wkv7 takes it from CHUNKED_FROM_TOKENS on."""
    args = wkv7_inputs(gen, T, 2, N)
    want = v7.wkv7(*args)
    s = args[-1].clone()
    got = kernels.wkv7_chunked(*args[:-1], s, 0)
    assert_close((got, s), want, f"wkv7_chunked T={T} N={N}")
    assert_close(ops.wkv7(*args, ext=kernels), want, f"ops.wkv7 T={T} N={N}")


@pytest.mark.parametrize("decay", [0.5453, 1e-3, 1.0])
def test_wkv7_chunked_at_the_decays_edges(kernels, gen, decay):
    """RWKV-7's strongest decay keeps the chunked form (1 / D grows to e^19 over a chunk); a far stronger one (not
    RWKV-7's, but the kernel takes any) runs its chunks token by token, and no decay keeps the state."""
    args = wkv7_inputs(gen, 70, 2, 64, decay)
    want = v7.wkv7(*args)
    s = args[-1].clone()
    got = kernels.wkv7_chunked(*args[:-1], s, 0)
    assert torch.isfinite(got).all() and torch.isfinite(s).all()
    assert_close((got, s), want, f"wkv7_chunked decay={decay}")
    assert_close(v7.wkv7_chunked(*args), want, f"torch wkv7_chunked decay={decay}")


@pytest.mark.parametrize("chunk", [1, 7, 32, 64])
def test_torch_chunked_recurrence_is_the_serial_one(gen, chunk):
    args = wkv7_inputs(gen, 90, 3, 32)
    assert_close(v7.wkv7_chunked(*args, chunk=chunk), v7.wkv7(*args), f"torch wkv7_chunked chunk={chunk}")


def int8_matrix(g, rows, cols):
    q = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8)
    mx, my = rand(g, cols, scale=0.01), rand(g, rows, scale=0.01)
    rx, ry = torch.rand(cols, generator=g) * 0.01, torch.rand(rows, generator=g) * 0.01
    weight = (q.float() + 0.5) * ry.unsqueeze(1) * rx + my.unsqueeze(1) + mx  # the pip package's scheme
    return q, [mx, rx, my, ry], weight


@pytest.mark.parametrize("T", [1, 2, 17])
@pytest.mark.parametrize("rows, cols", [(1, 4), (67, 36), (301, 520), (4099, 8)])  # rows: no multiple of 4
def test_int8(kernels, gen, T, rows, cols):
    """One token through int8_gemv (rows split over blocks, atomics), more through int8_dequant and a matmul."""
    q, companions, weight = int8_matrix(gen, rows, cols)
    x = rand(gen, T, rows)
    assert_close([ops.int8_matmul(x, q, companions, ext=kernels)], [x @ weight], f"int8 T={T} {rows}x{cols}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_dequant_in_the_activation_dtype(kernels, gen, dtype):
    q, companions, weight = int8_matrix(gen, 67, 36)
    got = kernels.int8_dequant(q, *companions, dtype, 0)
    assert got.dtype == dtype and torch.equal(got, weight.to(dtype)), f"seed {SEED}"


def test_what_has_no_kernel_takes_the_torch_path(kernels):
    t = torch.zeros(2, 1, 48)  # head size 48: no kernel
    assert ops.wkv7(t, t, t, t, t, t, torch.zeros(1, 48, 48), ext=kernels) is None
    assert ops.int8_matmul(torch.zeros(1, 8), torch.zeros(8, 6, dtype=torch.uint8),
                           [torch.zeros(6), torch.zeros(6), torch.zeros(8), torch.zeros(8)], ext=kernels) is None
    with pytest.raises(ValueError, match="head size"):  # the entry itself refuses, as the CUDA build does
        kernels.wkv7(*(torch.zeros(2, 1, 48) for _ in range(6)), torch.zeros(1, 48, 48), 0)


def test_the_self_test_passes_on_the_real_kernels(kernels):
    checks = selftest.check_kernels(kernels, "cpu", seed=SEED)
    assert {c.kernel for c in checks} == {"wkv4", "wkv5", "wkv7", "wkv7_chunked", "int8_gemv", "int8_dequant"}
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]


# ---- broken on purpose: each copy of the kernels must fail where it was broken, and only there -----------------
SYNC_AFTER_WRITES = "        __syncthreads();\n        const size_t out = base;\n"  # in wkv5 and wkv7
MUTANTS = {
    "an off-by-one in an index (int8_gemv's fourth output takes the third's scale)":
        ("rx[o + 3] * acc3", "rx[o + 2] * acc3", {"int8_gemv"}),
    "an off-by-one in a loop bound (wkv7's removal sum)":
        ("for (int j = 0; j < N; j++) sa += s[j] * removal[j];",
         "for (int j = 0; j < N - 1; j++) sa += s[j] * removal[j];", {"wkv7"}),
    "the __syncthreads between writing shared memory and reading it, removed":
        (SYNC_AFTER_WRITES, "        const size_t out = base;\n", {"wkv5", "wkv7"}),
    "the __syncthreads before overwriting shared memory, removed (wkv5)":
        ("        __syncthreads();\n        rs[j] = r_n;", "        rs[j] = r_n;", {"wkv5"}),
    "the __syncthreads between the chunk's c and reusing G's memory, removed (wkv7_chunked)":
        ("        __syncthreads();  // every row's c is made", "        // every row's c is made", {"wkv7_chunked"}),
    "the chunk's diagonal left out of the outputs (wkv7_chunked)":
        ("const int last = diagonal ? t : t - 1;", "const int last = t - 1;", {"wkv7_chunked"}),
}


def mutant(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the kernel sources with `old` replaced by `new` in rwkv_kernels.cuh."""
    for name in SOURCES:
        shutil.copy(CUDA_DIR / name, tmp_path / name)
    header = tmp_path / "rwkv_kernels.cuh"
    text = header.read_text()
    assert text.count(old) >= 1, f"the mutation no longer applies: {old!r}"
    header.write_text(text.replace(old, new))
    return tmp_path


@pytest.mark.parametrize("name", list(MUTANTS))
def test_broken_kernels_fail(name, tmp_path):
    old, new, broken = MUTANTS[name]
    ext = on_cpu.build(mutant(tmp_path, old, new))
    ext.set_schedule_seed(SEED)
    failed = {c.kernel for c in selftest.check_kernels(ext, "cpu", seed=SEED) if not c.passed}
    assert failed == broken, f"{name}: failed {failed}, expected {broken} (seed {SEED})"


def test_a_barrier_some_threads_skip_is_named(tmp_path):
    loop = "    for (int t = 0; t < T; t++) {\n        __syncthreads();\n        rs[i] = r_n;"
    skip = "    for (int t = 0; t < T; t++) {\n        if (t == 1 && i == N - 1) return;\n        __syncthreads();\n" \
           "        rs[i] = r_n;"
    ext = on_cpu.build(mutant(tmp_path, loop, skip))
    checks = {c.kernel: c for c in selftest.check_kernels(ext, "cpu", seed=SEED)}
    assert not checks["wkv7"].passed and "KernelFault" in checks["wkv7"].detail
    assert "__syncthreads() that not every thread of the block reaches" in checks["wkv7"].detail
    assert all(c.passed for k, c in checks.items() if k != "wkv7")


def test_a_hang_stops_with_one_line(tmp_path):
    """A thread that never reaches its barrier: the launch's watchdog stops the process after the timeout with one
    line (the stuck thread cannot be unwound), so CI fails fast instead of hanging."""
    loop = "    for (int t = 0; t < T; t++) {\n        __syncthreads();\n        rs[j] = r_n;"
    spin = "    { volatile int spin = (j == 0); while (spin) {} }\n" + loop
    folder = mutant(tmp_path, loop, spin)
    on_cpu.build(folder)  # compiled here (cached), so the child's time is the hang's alone
    code = ("import sys; from pathlib import Path; from rwkv_convert.cuda import on_cpu, selftest;"
            f" selftest.check_kernels(on_cpu.build(Path({str(folder)!r})), 'cpu')")
    env = {**os.environ, "RWKV_CONVERT_KERNEL_TIMEOUT_S": "2"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 124, proc.stderr
    assert len(lines) == 1 and "wkv5_kernel" in lines[0] and "blocks of 16 threads" in lines[0], lines
    assert "made no progress for 2 s: a thread never reaches its barrier or never ends" in lines[0], lines


# ---- the self-test decides, and its verdict is kept --------------------------------------------------------------
def run_fixture(kernels: str, corrupt: str | None, cache: Path) -> subprocess.CompletedProcess:
    """The v7 fixture's logits with the CUDA kernels' CPU build (or the torch path), in a child with its own cache;
    it prints whether they equal the torch path's exactly and how far apart they are. corrupt: a kernel of the
    CPU build made wrong in the child (1 added to its first output), under another card's name so that no
    verdict of the honest build covers it."""
    code = f"""
import torch, rwkv_convert
from rwkv_convert.cuda import on_cpu
from rwkv_convert.runner import Model
corrupt = {corrupt!r}
if corrupt:
    honest = getattr(on_cpu.KernelsOnCpu, corrupt)
    def wrong(self, *args, **kwargs):
        out = honest(self, *args, **kwargs)
        (out[0] if isinstance(out, tuple) else out).view(-1)[0] += 1
        return out
    setattr(on_cpu.KernelsOnCpu, corrupt, wrong)
    on_cpu.CARD += f" ({{corrupt}} corrupted by a test)"
ckpt = rwkv_convert.read_checkpoint({str(fixture_path("v7"))!r})
tokens = {tokens_for(9)!r}
got = Model(ckpt, "cpu fp32", kernels={kernels!r}).forward(tokens, None, full_output=True)[0]
want = Model(ckpt, "cpu fp32", kernels="torch").forward(tokens, None, full_output=True)[0]
print(torch.equal(got, want), (got - want).abs().max().item())
"""
    env = {**os.environ, "RWKV_CONVERT_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


def test_a_corrupted_kernel_is_disabled_with_one_line_and_the_torch_path_runs(tmp_path):
    for attempt in ("self-test", "cached verdict"):
        proc = run_fixture("cuda-on-cpu", "wkv7", tmp_path)
        assert proc.returncode == 0, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, (attempt, lines)
        assert "CUDA kernels disabled on the CPU build of the CUDA kernels (wkv7 corrupted by a test)" \
               in lines[0] and "wkv7 differs from the torch path by" in lines[0], lines[0]
        assert proc.stdout.split()[0] == "True", (attempt, proc.stdout)  # exactly the torch path's logits
    assert list(tmp_path.rglob("*selftest-the_CPU_build*wkv7*.json"))  # the verdict, kept beside the build


def test_the_cpu_build_runs_the_model_within_bounds_of_the_torch_path(tmp_path):
    proc = run_fixture("cuda-on-cpu", None, tmp_path)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    equal, diff = proc.stdout.split()
    assert float(diff) <= 1e-4, proc.stdout


def test_the_runner_calls_the_cpu_build(monkeypatch):
    assert on_cpu.trusted_kernels() is not None  # built and self-tested before counting (or the verdict was kept)
    calls = []
    for name in ("wkv7", "wkv7_chunked"):
        real = getattr(on_cpu.KernelsOnCpu, name)
        monkeypatch.setattr(on_cpu.KernelsOnCpu, name,
                            lambda self, *a, name=name, real=real: calls.append(name) or real(self, *a))
    model = Model(rwkv_convert.read_checkpoint(fixture_path("v7")), "cpu fp32", kernels="cuda-on-cpu")
    model.forward(tokens_for(3))  # 64 tokens: a prefill, through the chunked kernel
    model.forward(tokens_for(3)[:1])  # one token: the step kernel
    assert calls == ["wkv7_chunked"] * model.spec.n_layer + ["wkv7"] * model.spec.n_layer
