"""CUDA kernels of the reference runner (rwkv_kernels.cu), built on first use with torch's cpp_extension for
the card in use and cached; every op falls back to the runner's torch code when they are not available."""
