// The CUDA build of the reference runner's kernels (rwkv_kernels.cuh): torch tensors in and out, for
// rwkv_convert/cuda/ops.py. kernels_on_cpu.cpp builds the same kernels for the CPU, for the tests.
#include <torch/extension.h>
#include <cuda_runtime.h>

#include "rwkv_kernels.cuh"

// The caller passes torch.cuda.current_stream().cuda_stream: launches join the current stream (and CUDA graph
// captures) without c10/cuda headers, which torch's CPU wheels lack (so this file compile-checks anywhere).
#define STREAM reinterpret_cast<cudaStream_t>(stream)
#define LAUNCH_CHECK() do { cudaError_t e = cudaGetLastError(); \
    TORCH_CHECK(e == cudaSuccess, "CUDA kernel launch failed: ", cudaGetErrorString(e)); } while (0)

#define CHECK_CUDA_F32(x) TORCH_CHECK((x).is_cuda() && (x).is_contiguous() && (x).scalar_type() == torch::kFloat32, \
                                      #x " must be a contiguous fp32 CUDA tensor")
#define CHECK_CUDA_U8(x) TORCH_CHECK((x).is_cuda() && (x).is_contiguous() && (x).scalar_type() == torch::kUInt8, \
                                     #x " must be a contiguous uint8 CUDA tensor")

torch::Tensor wkv4(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                   torch::Tensor aa, torch::Tensor bb, torch::Tensor pp, int64_t stream) {
    CHECK_CUDA_F32(w); CHECK_CUDA_F32(u); CHECK_CUDA_F32(k); CHECK_CUDA_F32(v);
    CHECK_CUDA_F32(aa); CHECK_CUDA_F32(bb); CHECK_CUDA_F32(pp);
    auto y = torch::empty_like(k);
    launch_wkv4(k.size(0), k.size(1), w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr<float>(),
                v.data_ptr<float>(), y.data_ptr<float>(), aa.data_ptr<float>(), bb.data_ptr<float>(),
                pp.data_ptr<float>(), STREAM);
    LAUNCH_CHECK();
    return y;
}

torch::Tensor wkv5(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor w, torch::Tensor u,
                   torch::Tensor s, int64_t stream) {
    CHECK_CUDA_F32(r); CHECK_CUDA_F32(k); CHECK_CUDA_F32(v); CHECK_CUDA_F32(w); CHECK_CUDA_F32(u); CHECK_CUDA_F32(s);
    const int T = r.size(0), H = r.size(1), N = r.size(2);
    auto y = torch::empty_like(r);
    TORCH_CHECK(launch_wkv5(T, H, N, r.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                            w.data_ptr<float>(), w.dim() == 3, u.data_ptr<float>(), s.data_ptr<float>(),
                            y.data_ptr<float>(), STREAM),
                "wkv5: head size ", N, " has no kernel (16, 32, 64, 128)");
    LAUNCH_CHECK();
    return y;
}

// Either RWKV-7 kernel (token by token, or in chunks for a prefill): the same arguments, the same results.
template <typename Launch>
torch::Tensor run_wkv7(Launch launch, const char* name, torch::Tensor r, torch::Tensor w, torch::Tensor k,
                       torch::Tensor v, torch::Tensor kk, torch::Tensor a, torch::Tensor s, int64_t stream) {
    CHECK_CUDA_F32(r); CHECK_CUDA_F32(w); CHECK_CUDA_F32(k); CHECK_CUDA_F32(v); CHECK_CUDA_F32(kk);
    CHECK_CUDA_F32(a); CHECK_CUDA_F32(s);
    const int T = r.size(0), H = r.size(1), N = r.size(2);
    auto y = torch::empty_like(r);
    TORCH_CHECK(launch(T, H, N, r.data_ptr<float>(), w.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                       kk.data_ptr<float>(), a.data_ptr<float>(), s.data_ptr<float>(), y.data_ptr<float>(), STREAM),
                name, ": head size ", N, " has no kernel (16, 32, 64, 128)");
    LAUNCH_CHECK();
    return y;
}

torch::Tensor wkv7(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor kk,
                   torch::Tensor a, torch::Tensor s, int64_t stream) {
    return run_wkv7(launch_wkv7, "wkv7", r, w, k, v, kk, a, s, stream);
}

torch::Tensor wkv7_chunked(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor kk,
                           torch::Tensor a, torch::Tensor s, int64_t stream) {
    return run_wkv7(launch_wkv7_chunked, "wkv7_chunked", r, w, k, v, kk, a, s, stream);
}

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor mx, torch::Tensor rx, torch::Tensor my,
                        torch::Tensor ry, int64_t stream) {
    CHECK_CUDA_F32(x); CHECK_CUDA_F32(mx); CHECK_CUDA_F32(rx); CHECK_CUDA_F32(my); CHECK_CUDA_F32(ry);
    CHECK_CUDA_U8(q);
    const int in_dim = q.size(0), out_dim = q.size(1);
    TORCH_CHECK(out_dim % 4 == 0, "int8_gemv: the output width must be a multiple of 4");
    auto y = torch::zeros({out_dim}, x.options());
    launch_int8_gemv(in_dim, out_dim, x.data_ptr<float>(), q.data_ptr<uint8_t>(), mx.data_ptr<float>(),
                     rx.data_ptr<float>(), my.data_ptr<float>(), ry.data_ptr<float>(), y.data_ptr<float>(), STREAM);
    LAUNCH_CHECK();
    return y;
}

torch::Tensor int8_dequant(torch::Tensor q, torch::Tensor mx, torch::Tensor rx, torch::Tensor my, torch::Tensor ry,
                           torch::ScalarType dtype, int64_t stream) {
    CHECK_CUDA_F32(mx); CHECK_CUDA_F32(rx); CHECK_CUDA_F32(my); CHECK_CUDA_F32(ry);
    CHECK_CUDA_U8(q);
    const int in_dim = q.size(0), out_dim = q.size(1);
    auto out = torch::empty({in_dim, out_dim}, q.options().dtype(dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "int8_dequant", [&] {
        launch_int8_dequant<scalar_t>(in_dim, out_dim, q.data_ptr<uint8_t>(), mx.data_ptr<float>(),
                                      rx.data_ptr<float>(), my.data_ptr<float>(), ry.data_ptr<float>(),
                                      out.data_ptr<scalar_t>(), STREAM);
    });
    LAUNCH_CHECK();
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("wkv4", &wkv4, "RWKV-4 WKV over T tokens; updates aa, bb, pp in place");
    m.def("wkv5", &wkv5, "RWKV-5/6 WKV over T tokens (bonus included); updates the state in place");
    m.def("wkv7", &wkv7, "RWKV-7 delta-rule WKV over T tokens; updates the state in place");
    m.def("wkv7_chunked", &wkv7_chunked, "RWKV-7 WKV over T tokens in chunks (prefill); updates the state in place");
    m.def("int8_gemv", &int8_gemv, "one-token product with a pip-scheme int8 matrix, fp32 out");
    m.def("int8_dequant", &int8_dequant, "pip-scheme int8 matrix to [in, out] in dtype");
}
