// The CPU build of rwkv_kernels.cuh, for the tests and the self-test's own check (rwkv_convert/cuda/on_cpu.py):
// the CUDA kernels as written, compiled as C++20 with cuda_on_cpu.h. Each entry returns 0, or 1 after a failed
// launch (rwkv_kernel_error() says why), or 2 for a head size without a kernel.
#include <string.h>

#include "cuda_on_cpu.h"
#include "rwkv_kernels.cuh"

// Only the entries below are visible: each build (the tests load broken copies beside the real one in one
// process) keeps its kernels, inline functions and shared arrays to itself (with -fvisibility=hidden, -fno-gnu-unique).
#define EXPORT __attribute__((visibility("default")))

static int finish() { return cuda_on_cpu::last_error().empty() ? 0 : 1; }

extern "C" {

EXPORT const char* rwkv_kernel_error(void) { return cuda_on_cpu::last_error().c_str(); }

EXPORT void rwkv_set_schedule_seed(uint64_t seed) { cuda_on_cpu::schedule_seed() = seed; }

EXPORT int rwkv_wkv4(int T, int C, const float* w, const float* u, const float* k, const float* v, float* y, float* aa,
              float* bb, float* pp) {
    launch_wkv4(T, C, w, u, k, v, y, aa, bb, pp, nullptr);
    return finish();
}

EXPORT int rwkv_wkv5(int T, int H, int N, const float* r, const float* k, const float* v, const float* w, int w_per_token,
              const float* u, float* s, float* y) {
    if (!launch_wkv5(T, H, N, r, k, v, w, w_per_token != 0, u, s, y, nullptr)) return 2;
    return finish();
}

EXPORT int rwkv_wkv7(int T, int H, int N, const float* r, const float* w, const float* k, const float* v, const float* kk,
              const float* a, float* s, float* y) {
    if (!launch_wkv7(T, H, N, r, w, k, v, kk, a, s, y, nullptr)) return 2;
    return finish();
}

EXPORT int rwkv_wkv7_chunked(int T, int H, int N, const float* r, const float* w, const float* k, const float* v,
                      const float* kk, const float* a, float* s, float* y) {
    if (!launch_wkv7_chunked(T, H, N, r, w, k, v, kk, a, s, y, nullptr)) return 2;
    return finish();
}

EXPORT int rwkv_int8_gemv(int in_dim, int out_dim, const float* x, const uint8_t* q, const float* mx, const float* rx,
                   const float* my, const float* ry, float* y) {
    memset(y, 0, sizeof(float) * (size_t)out_dim);  // the kernel adds its partial sums into y
    launch_int8_gemv(in_dim, out_dim, x, q, mx, rx, my, ry, y, nullptr);
    return finish();
}

EXPORT int rwkv_int8_dequant(int in_dim, int out_dim, const uint8_t* q, const float* mx, const float* rx, const float* my,
                      const float* ry, float* out) {
    launch_int8_dequant<float>(in_dim, out_dim, q, mx, rx, my, ry, out, nullptr);
    return finish();
}

}  // extern "C"
