"""The runtimes our files run in, one module each: our own runner as a session (ours), the `rwkv` pip package
(pip_package), llama.cpp through llama-cpp-python (llama_cpp), onnxruntime (onnx_runtime, with the ONNX
files' layout and checksums it shares with the writer), transformers with rwkv7-hf (hf_transformers), web-rwkv
through web-rwkv-py (web_rwkv), MLX through mlx-lm (mlx_lm). Each
client declares a `Client` (runtimes/base.py): its name in verdicts, what it needs and how to install it;
verify, quality, release and doctor ask them. An opened file is a `Session` (base.py: logits of chunks fed
with the state carried; `verify_modes` feeds a stream verify's three ways). The pip package runs in a process
of its own, a batch of jobs at a time (pip_package.py), and returns the same modes. A client gets only files our
readers checked (client_files.py)."""

from __future__ import annotations

from .base import Client, ClientRun
from .hf_transformers import CLIENT as TRANSFORMERS
from .hf_transformers import RWKV7_HF
from .llama_cpp import CLIENT as LLAMA_CPP
from .mlx_lm import CLIENT as MLX_LM
from .onnx_runtime import CLIENT as ONNXRUNTIME
from .pip_package import CLIENT as PIP_PACKAGE
from .web_rwkv import CLIENT as WEB_RWKV

CLIENTS: tuple[Client, ...] = (ONNXRUNTIME, LLAMA_CPP, PIP_PACKAGE, TRANSFORMERS, RWKV7_HF, WEB_RWKV, MLX_LM)

__all__ = ["CLIENTS", "LLAMA_CPP", "MLX_LM", "ONNXRUNTIME", "PIP_PACKAGE", "RWKV7_HF", "TRANSFORMERS", "WEB_RWKV",
           "Client", "ClientRun"]
