"""CUDA kernels of the reference runner (rwkv_kernels.cu), built on first use with torch's cpp_extension for
the card in use and cached; every op falls back to the runner's torch code when they are not available."""

HEAD_SIZES = (16, 32, 64, 128)  # the head sizes rwkv_kernels.cuh instantiates its per-head kernels for
