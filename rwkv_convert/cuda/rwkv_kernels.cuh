// The reference runner's CUDA kernels: the WKV recurrences of RWKV-4, 5.x/6 and 7 (sequence and one-token: the
// same kernel, T >= 1) and the pip package's int8 scheme (a one-token GEMV and a dequantisation for batched
// products), each with a launch_* function on raw pointers. Two builds include this file: rwkv_kernels.cu (nvcc,
// torch tensors in and out) and kernels_on_cpu.cpp (C++ with cuda_on_cpu.h, for the tests). Every kernel has a
// torch fallback with the same semantics (rwkv_convert/cuda/ops.py names them); the tests and the self-test
// compare the two. Layouts follow the runner: activations [T, H, N] fp32, states fp32, v5/v6 state
// [H, N_key, N_value], v7 state [H, N_value, N_key], int8 q [in, out].
#pragma once

#include <stdint.h>

#include <type_traits>

#ifndef KERNEL_LAUNCH  // nvcc; cuda_on_cpu.h defines its own
#define KERNEL_LAUNCH(kernel, grid, block, stream) kernel<<<dim3(grid), dim3(block), 0, (stream)>>>
#endif

// The per-head kernels are instantiated for these head sizes (the state row lives in registers). False for others.
template <typename Launch>
bool with_head_size(int N, Launch&& launch) {
    switch (N) {
        case 16: launch(std::integral_constant<int, 16>{}); return true;
        case 32: launch(std::integral_constant<int, 32>{}); return true;
        case 64: launch(std::integral_constant<int, 64>{}); return true;
        case 128: launch(std::integral_constant<int, 128>{}); return true;
        default: return false;
    }
}

// ---- RWKV-4: one thread per channel walks the tokens; (aa, bb, pp) stay in registers -------------------------
__global__ void wkv4_kernel(int T, int C, const float* __restrict__ w, const float* __restrict__ u,
                            const float* __restrict__ k, const float* __restrict__ v, float* __restrict__ y,
                            float* __restrict__ aa_io, float* __restrict__ bb_io, float* __restrict__ pp_io) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float aa = aa_io[c], bb = bb_io[c], pp = pp_io[c];
    const float wc = w[c], uc = u[c];
    for (int t = 0; t < T; t++) {
        const float kt = k[t * C + c], vt = v[t * C + c];
        float ww = uc + kt;
        float p = fmaxf(pp, ww);
        float e1 = expf(pp - p), e2 = expf(ww - p);
        y[t * C + c] = (e1 * aa + e2 * vt) / (e1 * bb + e2);
        ww = wc + pp;
        p = fmaxf(ww, kt);
        e1 = expf(ww - p);
        e2 = expf(kt - p);
        aa = e1 * aa + e2 * vt;
        bb = e1 * bb + e2;
        pp = p;
    }
    aa_io[c] = aa; bb_io[c] = bb; pp_io[c] = pp;
}

inline void launch_wkv4(int T, int C, const float* w, const float* u, const float* k, const float* v, float* y,
                        float* aa, float* bb, float* pp, cudaStream_t stream) {
    const int threads = 128;
    KERNEL_LAUNCH(wkv4_kernel, (C + threads - 1) / threads, threads, stream)(T, C, w, u, k, v, y, aa, bb, pp);
}

// ---- RWKV-5.x / 6: one block per head, thread j owns value column j of the state -----------------------------
// y_j = sum_i r_i (u_i k_i v_j + S_ij);  S_ij = S_ij w_i + k_i v_j.  w is per token ([T,H,N]) or fixed ([H,N]).
template <int N>
__global__ void wkv5_kernel(int T, int H, const float* __restrict__ r, const float* __restrict__ k,
                            const float* __restrict__ v, const float* __restrict__ w, bool w_per_token,
                            const float* __restrict__ u, float* __restrict__ s_io, float* __restrict__ y) {
    const int h = blockIdx.x, j = threadIdx.x;
    __shared__ float rs[N], ks[N], ws[N], us[N];
    float s[N];
    float* sh = s_io + (size_t)h * N * N;
#pragma unroll
    for (int i = 0; i < N; i++) s[i] = sh[i * N + j];
    us[j] = u[h * N + j];
    if (!w_per_token) ws[j] = w[h * N + j];
    // This token's inputs were loaded during the previous token's arithmetic (global-load latency, not the
    // arithmetic, bounds a step of this sequential loop).
    size_t base = (size_t)h * N;
    float r_n = r[base + j], k_n = k[base + j], v_n = v[base + j], w_n = w_per_token ? w[base + j] : 0.f;
    for (int t = 0; t < T; t++) {
        __syncthreads();
        rs[j] = r_n;
        ks[j] = k_n;
        if (w_per_token) ws[j] = w_n;
        const float vj = v_n;
        __syncthreads();
        const size_t out = base;
        if (t + 1 < T) {
            base = ((size_t)(t + 1) * H + h) * N;
            r_n = r[base + j]; k_n = k[base + j]; v_n = v[base + j];
            if (w_per_token) w_n = w[base + j];
        }
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < N; i++) {
            const float kv = ks[i] * vj;
            acc += rs[i] * (us[i] * kv + s[i]);
            s[i] = s[i] * ws[i] + kv;
        }
        y[out + j] = acc;
    }
#pragma unroll
    for (int i = 0; i < N; i++) sh[i * N + j] = s[i];
}

// False for a head size without a kernel.
inline bool launch_wkv5(int T, int H, int N, const float* r, const float* k, const float* v, const float* w,
                        bool w_per_token, const float* u, float* s, float* y, cudaStream_t stream) {
    return with_head_size(N, [&](auto n) {
        constexpr int size = decltype(n)::value;
        KERNEL_LAUNCH(wkv5_kernel<size>, H, size, stream)(T, H, r, k, v, w, w_per_token, u, s, y);
    });
}

// ---- RWKV-7: one block per head, thread i owns value row i of the state ---------------------------------------
// sa_i = sum_j S_ij (-kk_j);  S_ij = S_ij w_j + sa_i (kk_j a_j) + v_i k_j;  y_i = sum_j S_ij r_j.
template <int N>
__global__ void wkv7_kernel(int T, int H, const float* __restrict__ r, const float* __restrict__ w,
                            const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ kk,
                            const float* __restrict__ a, float* __restrict__ s_io, float* __restrict__ y) {
    const int h = blockIdx.x, i = threadIdx.x;
    __shared__ float rs[N], ws[N], ks[N], removal[N], replace[N];
    float s[N];
    float* sh = s_io + (size_t)h * N * N;
#pragma unroll
    for (int j = 0; j < N; j++) s[j] = sh[i * N + j];
    size_t base = (size_t)h * N;  // inputs prefetched one token ahead, as in wkv5_kernel
    float r_n = r[base + i], w_n = w[base + i], k_n = k[base + i], v_n = v[base + i], kk_n = kk[base + i],
          a_n = a[base + i];
    for (int t = 0; t < T; t++) {
        __syncthreads();
        rs[i] = r_n;
        ws[i] = w_n;
        ks[i] = k_n;
        removal[i] = -kk_n;
        replace[i] = kk_n * a_n;
        const float vi = v_n;
        __syncthreads();
        const size_t out = base;
        if (t + 1 < T) {
            base = ((size_t)(t + 1) * H + h) * N;
            r_n = r[base + i]; w_n = w[base + i]; k_n = k[base + i]; v_n = v[base + i];
            kk_n = kk[base + i]; a_n = a[base + i];
        }
        float sa = 0.f;
#pragma unroll
        for (int j = 0; j < N; j++) sa += s[j] * removal[j];
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < N; j++) {
            s[j] = s[j] * ws[j] + sa * replace[j] + vi * ks[j];
            acc += s[j] * rs[j];
        }
        y[out + i] = acc;
    }
#pragma unroll
    for (int j = 0; j < N; j++) sh[i * N + j] = s[j];
}

// False for a head size without a kernel.
inline bool launch_wkv7(int T, int H, int N, const float* r, const float* w, const float* k, const float* v,
                        const float* kk, const float* a, float* s, float* y, cudaStream_t stream) {
    return with_head_size(N, [&](auto n) {
        constexpr int size = decltype(n)::value;
        KERNEL_LAUNCH(wkv7_kernel<size>, H, size, stream)(T, H, r, w, k, v, kk, a, s, y);
    });
}

// ---- RWKV-7 in chunks (prefill): the delta rule in matrix form, arch/v7.py's wkv7_chunked -------------------------
// Per chunk of L tokens from state S0 (thread i owns value row i of S, as in wkv7_kernel), with alpha = -kk,
// beta = kk*a and D_t the cumulative decay up to t (a per-key vector; D_{t-1} before t):
//   c_t = S_{t-1} . alpha_t = S0 . x_t + sum_{tau<t} (v_tau[i] K[tau][t] + c_tau G[tau][t]),  x_t = D_{t-1} alpha_t
//   G[tau][t] = (beta_tau / D_tau) . x_t,  K[tau][t] = (k_tau / D_tau) . x_t
//   y_t[i] = S0 . (D_t r_t) + sum_{tau<=t} (c_tau Gb[tau][t] + v_tau[i] Kb[tau][t]),  Gb, Kb as G, K with D_t r_t
//   S_L = (S0 + sum_tau (c_tau beta_tau + v_tau[i] k_tau) / D_tau) * D_L
// The per-token chain is only the c_t recurrence (t numbers per row); the rest is dot products over the chunk,
// with a handful of barriers per chunk instead of two per token. 1 / D_tau grows to e^(0.607 L) at RWKV-7's
// strongest decay: a chunk whose cumulative decay leaves e^(+-CHUNK_LOG_DECAY_LIMIT) runs token by token instead.
#define CHUNK_LOG_DECAY_LIMIT 60.f

// The chunk's pair products, shared out over the block's threads: for tau < t (tau <= t with the diagonal) and t
// within the chunk, pa[tau][t] = a[tau] . x[t] and pb[tau][t] = b[tau] . x[t]; 0 for every other pair.
template <int N, int L>
__device__ void chunk_products(int i, int len, bool diagonal, const float (&a)[L][N], const float (&b)[L][N],
                               const float (&x)[L][N], float (&pa)[L][L], float (&pb)[L][L]) {
    for (int e = i; e < L * L; e += N) {
        const int tau = e / L, t = e % L;
        const int last = diagonal ? t : t - 1;  // the last tau that reaches t
        float av = 0.f, bv = 0.f;
        if (tau <= last && t < len) {
#pragma unroll
            for (int j = 0; j < N; j++) {
                av += a[tau][j] * x[t][j];
                bv += b[tau][j] * x[t][j];
            }
        }
        pa[tau][t] = av;
        pb[tau][t] = bv;
    }
}

template <int N, int L>
__global__ void wkv7_chunked_kernel(int T, int H, const float* __restrict__ r, const float* __restrict__ w,
                                    const float* __restrict__ k, const float* __restrict__ v,
                                    const float* __restrict__ kk, const float* __restrict__ a,
                                    float* __restrict__ s_io, float* __restrict__ y) {
    const int h = blockIdx.x, i = threadIdx.x;
    // per token of the chunk, per key: x_t, beta_t / D_t, k_t / D_t, D_t r_t; then the chunk x chunk products
    __shared__ float xs[L][N], bs[L][N], ks[L][N], rs[L][N], last[N];
    __shared__ float g[L][L], kx[L][L];  // G and K, then Gb and Kb
    __shared__ int serial;
    float s[N];
    float* sh = s_io + (size_t)h * N * N;
#pragma unroll
    for (int j = 0; j < N; j++) s[j] = sh[i * N + j];
    for (int start = 0; start < T; start += L) {
        const int len = min(L, T - start);
        float vl[L], cl[L];
        // thread i as key i: the cumulative decay along the chunk, and the per-token vectors
        if (i == 0) serial = 0;
        __syncthreads();
        float cum = 0.f, lowest = 0.f, highest = 0.f;
        for (int t = 0; t < len; t++) {
            const size_t at = ((size_t)(start + t) * H + h) * N + i;
            const float log_w = logf(w[at]);
            const float before = expf(cum);
            cum += log_w;
            lowest = fminf(lowest, cum);
            highest = fmaxf(highest, cum);
            const float decay = expf(cum);
            xs[t][i] = -kk[at] * before;
            bs[t][i] = kk[at] * a[at] / decay;
            ks[t][i] = k[at] / decay;
            rs[t][i] = r[at] * decay;
        }
        last[i] = expf(cum);
        if (lowest < -CHUNK_LOG_DECAY_LIMIT || highest > CHUNK_LOG_DECAY_LIMIT) serial = 1;
#pragma unroll
        for (int t = 0; t < L; t++) vl[t] = t < len ? v[((size_t)(start + t) * H + h) * N + i] : 0.f;
        __syncthreads();
        if (serial) {  // token by token, as wkv7_kernel (the chunk's inputs are read again)
            for (int t = 0; t < len; t++) {
                const size_t at = ((size_t)(start + t) * H + h) * N;
                float sa = 0.f;
#pragma unroll
                for (int j = 0; j < N; j++) sa -= s[j] * kk[at + j];
                float acc = 0.f;
#pragma unroll
                for (int j = 0; j < N; j++) {
                    s[j] = s[j] * w[at + j] + sa * kk[at + j] * a[at + j] + vl[t] * k[at + j];
                    acc += s[j] * r[at + j];
                }
                y[at + i] = acc;
            }
            __syncthreads();  // before the next chunk's vectors overwrite the shared arrays
            continue;
        }
        chunk_products<N, L>(i, len, false, bs, ks, xs, g, kx);  // G and K: tau < t
        __syncthreads();
#pragma unroll
        for (int t = 0; t < L; t++) {
            float c = 0.f;
            if (t < len) {
#pragma unroll
                for (int j = 0; j < N; j++) c += s[j] * xs[t][j];
#pragma unroll
                for (int tau = 0; tau < t; tau++) c += vl[tau] * kx[tau][t] + cl[tau] * g[tau][t];
            }
            cl[t] = c;
        }
        __syncthreads();  // every row's c is made: G and K give way to Gb and Kb
        chunk_products<N, L>(i, len, true, bs, ks, rs, g, kx);  // Gb and Kb: tau <= t
        __syncthreads();
#pragma unroll
        for (int t = 0; t < L; t++) {
            if (t < len) {
                float acc = 0.f;
#pragma unroll
                for (int j = 0; j < N; j++) acc += s[j] * rs[t][j];
#pragma unroll
                for (int tau = 0; tau <= t; tau++) acc += cl[tau] * g[tau][t] + vl[tau] * kx[tau][t];
                y[((size_t)(start + t) * H + h) * N + i] = acc;
            }
        }
#pragma unroll
        for (int j = 0; j < N; j++) {
            float add = 0.f;
#pragma unroll
            for (int t = 0; t < L; t++) {
                if (t < len) add += cl[t] * bs[t][j] + vl[t] * ks[t][j];  // past len: a shorter chunk's leftovers
            }
            s[j] = (s[j] + add) * last[j];
        }
        __syncthreads();  // before the next chunk overwrites the shared arrays
    }
#pragma unroll
    for (int j = 0; j < N; j++) sh[i * N + j] = s[j];
}

// The chunk length per head size: what fits the 48 KB of static shared memory (4 L N + 2 L^2 + N floats).
template <int N>
constexpr int wkv7_chunk() { return N <= 64 ? 32 : 16; }

// False for a head size without a kernel.
inline bool launch_wkv7_chunked(int T, int H, int N, const float* r, const float* w, const float* k, const float* v,
                                const float* kk, const float* a, float* s, float* y, cudaStream_t stream) {
    return with_head_size(N, [&](auto n) {
        constexpr int size = decltype(n)::value;
        KERNEL_LAUNCH((wkv7_chunked_kernel<size, wkv7_chunk<size>()>), H, size, stream)(T, H, r, w, k, v, kk, a, s, y);
    });
}

// ---- int8 (the pip package's scheme): W[i,o] = (q[i,o] + 0.5) ry[i] rx[o] + my[i] + mx[o] ----------------------
// One token: y[o] = rx[o] * sum_i (x_i ry_i)(q_io + 0.5) + sum_i x_i my_i + mx[o] sum_i x_i.
// Thread: 4 adjacent outputs (one 32-bit load of q per row); grid.y splits the rows; partial sums by atomicAdd
// into an fp32 output that the caller zeroed (so enough blocks stream the matrix to fill the memory system).
__global__ void int8_gemv_kernel(int in_dim, int out_dim, int rows_per_split, const float* __restrict__ x,
                                 const uint8_t* __restrict__ q, const float* __restrict__ mx,
                                 const float* __restrict__ rx, const float* __restrict__ my,
                                 const float* __restrict__ ry, float* __restrict__ y) {
    const int o = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    const int begin = blockIdx.y * rows_per_split;
    const int end = min(in_dim, begin + rows_per_split);
    if (o >= out_dim) return;
    float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f, sx = 0.f, sxm = 0.f;
    for (int i = begin; i < end; i++) {
        const float xi = x[i];
        const float xr = xi * ry[i];
        const uchar4 qv = *reinterpret_cast<const uchar4*>(q + (size_t)i * out_dim + o);
        acc0 += xr * (qv.x + 0.5f);
        acc1 += xr * (qv.y + 0.5f);
        acc2 += xr * (qv.z + 0.5f);
        acc3 += xr * (qv.w + 0.5f);
        sx += xi;
        sxm += xi * my[i];
    }
    atomicAdd(y + o, rx[o] * acc0 + sxm + mx[o] * sx);
    atomicAdd(y + o + 1, rx[o + 1] * acc1 + sxm + mx[o + 1] * sx);
    atomicAdd(y + o + 2, rx[o + 2] * acc2 + sxm + mx[o + 2] * sx);
    atomicAdd(y + o + 3, rx[o + 3] * acc3 + sxm + mx[o + 3] * sx);
}

// y must be zeroed [out_dim]; out_dim a multiple of 4 (the caller checks).
inline void launch_int8_gemv(int in_dim, int out_dim, const float* x, const uint8_t* q, const float* mx,
                             const float* rx, const float* my, const float* ry, float* y, cudaStream_t stream) {
    const int threads = 128;
    const int col_blocks = (out_dim / 4 + threads - 1) / threads;
    const int splits = max(1, min(in_dim / 64, 264 / col_blocks + 1));
    const int rows_per_split = (in_dim + splits - 1) / splits;
    const dim3 grid(col_blocks, (in_dim + rows_per_split - 1) / rows_per_split);
    KERNEL_LAUNCH(int8_gemv_kernel, grid, threads, stream)(in_dim, out_dim, rows_per_split, x, q, mx, rx, my, ry, y);
}

template <typename scalar_t>
__global__ void int8_dequant_kernel(int in_dim, int out_dim, const uint8_t* __restrict__ q,
                                    const float* __restrict__ mx, const float* __restrict__ rx,
                                    const float* __restrict__ my, const float* __restrict__ ry,
                                    scalar_t* __restrict__ out) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)in_dim * out_dim) return;
    const int i = idx / out_dim, o = idx % out_dim;
    out[idx] = static_cast<scalar_t>((q[idx] + 0.5f) * ry[i] * rx[o] + my[i] + mx[o]);
}

// Batched products: dequantise once into the activation dtype ([in, out]), then one matmul (in ops.py).
template <typename scalar_t>
void launch_int8_dequant(int in_dim, int out_dim, const uint8_t* q, const float* mx, const float* rx,
                         const float* my, const float* ry, scalar_t* out, cudaStream_t stream) {
    const size_t total = (size_t)in_dim * out_dim;
    const int threads = 256;
    const int blocks = (int)((total + threads - 1) / threads);
    KERNEL_LAUNCH(int8_dequant_kernel<scalar_t>, blocks, threads, stream)(in_dim, out_dim, q, mx, rx, my, ry, out);
}
