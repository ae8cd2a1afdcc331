// CUDA kernels of the reference runner: the WKV recurrences of RWKV-4, 5.x/6 and 7 (sequence and one-token:
// the same kernel, T >= 1) and the pip package's int8 scheme (a one-token GEMV and a dequantisation for
// batched products). Every kernel has a torch fallback with the same semantics in rwkv_convert/cuda/ops.py;
// the tests compare the two. Layouts follow the runner: activations [T, H, N] fp32, states fp32,
// v5/v6 state [H, N_key, N_value], v7 state [H, N_value, N_key], int8 q [in, out].
#include <torch/extension.h>
#include <cuda_runtime.h>

// The caller passes torch.cuda.current_stream().cuda_stream: launches join the current stream (and CUDA graph
// captures) without c10/cuda headers, which torch's CPU wheels lack (so this file compile-checks anywhere).
#define STREAM reinterpret_cast<cudaStream_t>(stream)
#define LAUNCH_CHECK() do { cudaError_t e = cudaGetLastError(); \
    TORCH_CHECK(e == cudaSuccess, "CUDA kernel launch failed: ", cudaGetErrorString(e)); } while (0)

#define CHECK_CUDA_F32(x) TORCH_CHECK((x).is_cuda() && (x).is_contiguous() && (x).scalar_type() == torch::kFloat32, \
                                      #x " must be a contiguous fp32 CUDA tensor")

// The per-head kernels are instantiated for these head sizes (the state row lives in registers).
template <typename Launch>
void with_head_size(int N, const char* name, Launch&& launch) {
    switch (N) {
        case 16: launch(std::integral_constant<int, 16>{}); break;
        case 32: launch(std::integral_constant<int, 32>{}); break;
        case 64: launch(std::integral_constant<int, 64>{}); break;
        case 128: launch(std::integral_constant<int, 128>{}); break;
        default: TORCH_CHECK(false, name, ": head size ", N, " has no kernel (16, 32, 64, 128)");
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

torch::Tensor wkv4(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                   torch::Tensor aa, torch::Tensor bb, torch::Tensor pp, int64_t stream) {
    CHECK_CUDA_F32(w); CHECK_CUDA_F32(u); CHECK_CUDA_F32(k); CHECK_CUDA_F32(v);
    CHECK_CUDA_F32(aa); CHECK_CUDA_F32(bb); CHECK_CUDA_F32(pp);
    const int T = k.size(0), C = k.size(1);
    auto y = torch::empty_like(k);
    const int threads = 128;
    wkv4_kernel<<<(C + threads - 1) / threads, threads, 0, STREAM>>>(
        T, C, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
        y.data_ptr<float>(), aa.data_ptr<float>(), bb.data_ptr<float>(), pp.data_ptr<float>());
    LAUNCH_CHECK();
    return y;
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

torch::Tensor wkv5(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor w, torch::Tensor u,
                   torch::Tensor s, int64_t stream) {
    CHECK_CUDA_F32(r); CHECK_CUDA_F32(k); CHECK_CUDA_F32(v); CHECK_CUDA_F32(w); CHECK_CUDA_F32(u); CHECK_CUDA_F32(s);
    const int T = r.size(0), H = r.size(1), N = r.size(2);
    const bool per_token = w.dim() == 3;
    auto y = torch::empty_like(r);
    with_head_size(N, "wkv5", [&](auto n) {
        wkv5_kernel<decltype(n)::value><<<H, decltype(n)::value, 0, STREAM>>>(
            T, H, r.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), w.data_ptr<float>(), per_token,
            u.data_ptr<float>(), s.data_ptr<float>(), y.data_ptr<float>());
    });
    LAUNCH_CHECK();
    return y;
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

torch::Tensor wkv7(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor kk,
                   torch::Tensor a, torch::Tensor s, int64_t stream) {
    CHECK_CUDA_F32(r); CHECK_CUDA_F32(w); CHECK_CUDA_F32(k); CHECK_CUDA_F32(v); CHECK_CUDA_F32(kk);
    CHECK_CUDA_F32(a); CHECK_CUDA_F32(s);
    const int T = r.size(0), H = r.size(1), N = r.size(2);
    auto y = torch::empty_like(r);
    with_head_size(N, "wkv7", [&](auto n) {
        wkv7_kernel<decltype(n)::value><<<H, decltype(n)::value, 0, STREAM>>>(
            T, H, r.data_ptr<float>(), w.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
            kk.data_ptr<float>(), a.data_ptr<float>(), s.data_ptr<float>(), y.data_ptr<float>());
    });
    LAUNCH_CHECK();
    return y;
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

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor mx, torch::Tensor rx, torch::Tensor my,
                        torch::Tensor ry, int64_t stream) {
    CHECK_CUDA_F32(x); CHECK_CUDA_F32(mx); CHECK_CUDA_F32(rx); CHECK_CUDA_F32(my); CHECK_CUDA_F32(ry);
    TORCH_CHECK(q.is_cuda() && q.is_contiguous() && q.scalar_type() == torch::kUInt8, "q must be contiguous uint8 CUDA");
    const int in_dim = q.size(0), out_dim = q.size(1);
    TORCH_CHECK(out_dim % 4 == 0, "int8_gemv: the output width must be a multiple of 4");
    auto y = torch::zeros({out_dim}, x.options());
    const int threads = 128;
    const int col_blocks = (out_dim / 4 + threads - 1) / threads;
    const int splits = std::max(1, std::min(in_dim / 64, 264 / col_blocks + 1));
    const int rows_per_split = (in_dim + splits - 1) / splits;
    dim3 grid(col_blocks, (in_dim + rows_per_split - 1) / rows_per_split);
    int8_gemv_kernel<<<grid, threads, 0, STREAM>>>(
        in_dim, out_dim, rows_per_split, x.data_ptr<float>(), q.data_ptr<uint8_t>(), mx.data_ptr<float>(),
        rx.data_ptr<float>(), my.data_ptr<float>(), ry.data_ptr<float>(), y.data_ptr<float>());
    LAUNCH_CHECK();
    return y;
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

// Batched products: dequantise once into the activation dtype ([in, out]), then one cuBLAS matmul (in ops.py).
torch::Tensor int8_dequant(torch::Tensor q, torch::Tensor mx, torch::Tensor rx, torch::Tensor my, torch::Tensor ry,
                           torch::ScalarType dtype, int64_t stream) {
    CHECK_CUDA_F32(mx); CHECK_CUDA_F32(rx); CHECK_CUDA_F32(my); CHECK_CUDA_F32(ry);
    TORCH_CHECK(q.is_cuda() && q.is_contiguous() && q.scalar_type() == torch::kUInt8, "q must be contiguous uint8 CUDA");
    const int in_dim = q.size(0), out_dim = q.size(1);
    auto out = torch::empty({in_dim, out_dim}, q.options().dtype(dtype));
    const size_t total = (size_t)in_dim * out_dim;
    const int threads = 256;
    const int blocks = (int)((total + threads - 1) / threads);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "int8_dequant", [&] {
        int8_dequant_kernel<scalar_t><<<blocks, threads, 0, STREAM>>>(
            in_dim, out_dim, q.data_ptr<uint8_t>(), mx.data_ptr<float>(), rx.data_ptr<float>(), my.data_ptr<float>(),
            ry.data_ptr<float>(), out.data_ptr<scalar_t>());
    });
    LAUNCH_CHECK();
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("wkv4", &wkv4, "RWKV-4 WKV over T tokens; updates aa, bb, pp in place");
    m.def("wkv5", &wkv5, "RWKV-5/6 WKV over T tokens (bonus included); updates the state in place");
    m.def("wkv7", &wkv7, "RWKV-7 delta-rule WKV over T tokens; updates the state in place");
    m.def("int8_gemv", &int8_gemv, "one-token product with a pip-scheme int8 matrix, fp32 out");
    m.def("int8_dequant", &int8_dequant, "pip-scheme int8 matrix to [in, out] in dtype");
}
