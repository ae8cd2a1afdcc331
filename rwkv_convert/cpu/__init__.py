"""Native CPU kernels of the reference runner (C, built with the system compiler on first use and cached):
the recurrences (wkv_cpu.c, used by ops.py) and the int8 GEMV (quant/int8_cpu.c, through build.library).
Without a compiler every op falls back to the runner's torch code."""
