"""The reference runner: a prepared RWKV model of any version, executed with plain torch ops.

Sequence mode batches every projection over the T tokens; only each version's recurrence walks the
tokens one by one. State is a flat list in the `rwkv` pip package's layout."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import arch
from .arch.common import PROJECTIONS_KEY, layer_norm
from .checkpoint import Checkpoint
from .cpu import ops as cpu_ops
from .cuda import on_cpu as cuda_on_cpu
from .cuda import ops as cuda_ops
from .errors import RwkvConvertError
from .plan import Plan, make_plan
from .prepare import Preparation, PreparedWeights
from .quant import held_for_cpu, held_lora_for_cpu
from .spec import ModelSpec
from .strategy import Placement, Strategy


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RwkvConvertError(f'the strategy asks for "{device}" but torch sees no CUDA device;'
                                   ' use "cpu fp32" (or "cpu bf16") here')
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise RwkvConvertError(f'the strategy asks for "{device}" but torch sees only'
                                   f" {torch.cuda.device_count()} CUDA device(s)")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise RwkvConvertError('the strategy asks for "mps" but torch has no MPS device; use "cpu fp32"')


KERNELS = ("auto", "torch", "cuda-on-cpu")


def recurrence_for(module, kernels: str = "auto"):
    """The version's recurrence: its torch code, or ("auto") the C kernel for the tensors' device (CUDA,
    or C on the CPU), with the torch code for what they cannot run (no GPU or compiler, a failed build, other
    head sizes). The version modules never pick a backend themselves, so the torch path can run anywhere and
    be compared with the kernels."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, not {kernels!r}")
    torch_code = module.RECURRENCE
    if kernels == "torch":
        return torch_code
    if kernels == "cuda-on-cpu":  # the CUDA kernels' CPU build (tests): its self-test decides, as on a card
        emulated, kernel = cuda_on_cpu.trusted_kernels(), getattr(cuda_ops, module.KERNEL)

        def run_emulated(*args):
            out = None if emulated is None or args[-1].is_cuda else kernel(*args, ext=emulated)
            return torch_code(*args) if out is None else out

        return run_emulated
    on_gpu, on_cpu = getattr(cuda_ops, module.KERNEL), getattr(cpu_ops, module.KERNEL)

    def run(*args):
        out = (on_gpu if args[-1].is_cuda else on_cpu)(*args)
        return torch_code(*args) if out is None else out

    return run


def _is_matrix(module, name: str) -> bool:
    return name in module.MATRICES or name == PROJECTIONS_KEY




class Model:
    """A runnable RWKV model. `forward(tokens, state=None, full_output=False) -> (logits, state)`."""

    def __init__(self, source: Checkpoint | PreparedWeights, strategy: str | Strategy | Plan = "cpu fp32",
                 rescale_layer: int | None = None, skip_passes: tuple[str, ...] = (), kernels: str = "auto",
                 ln0_fold: str = "fp32"):
        """The one constructor. source: original weights (a Checkpoint), prepared here for `strategy`, or weights
        already prepared (PreparedWeights, read from a converted file: they carry their plan, the other
        arguments but `kernels` do not apply). strategy: a strategy string, or the Plan of one on this
        checkpoint (plan.make_plan: what `rwkv-convert plan` prints is what runs). skip_passes: optional passes
        to leave out (passes.FOLD_LN0, passes.STACK), for comparisons; the rescale is set with rescale_layer
        (0 = none; a Plan has its own), since forward() halves x to match it. kernels: "auto" (the kernels: CUDA
        on GPU tensors, C on the CPU), "torch" (the torch code everywhere) or "cuda-on-cpu" (the recurrences
        through the CUDA kernels' CPU build, for tests: docs/cuda.md). ln0_fold: "fp32" (ours, the accurate one)
        or "package" (as the pip package folds it: v4-v6 in the file's dtype, v7 in the strategy's; see
        docs/numerics.md)."""
        if isinstance(source, PreparedWeights):
            self._setup(source.spec, source.plan, source.source, kernels)
            self.layers = [self._place(i, lw) for i, lw in enumerate(source.layers)]
            self._take(source.passes, source.ln0, source.emb, source.ln_out, source.head)
        else:
            plan = strategy if isinstance(strategy, Plan) else \
                make_plan(source.spec, source.shapes, strategy, rescale_layer)
            self._setup(source.spec, plan, source.path, kernels)
            per_token = ln0_fold == "fp32" and plan.placements[0].device == "cpu"
            self._prepare(source, Preparation(source.spec, plan, None, skip_passes, ln0_fold, per_token))
        self._state_template = [(tuple(t.shape), t.dtype, t.device) for t in self.init_state()]

    def _setup(self, spec: ModelSpec, plan: Plan, source, kernels: str = "auto") -> None:
        """Every constructor ends here: the model executes `plan` (its placements and fp16 rescale)."""
        self.spec, self.plan = spec, plan
        self.strategy = plan.parsed
        self.placements: list[Placement] = plan.placements
        for p in self.placements:
            _check_device(p.device)
        self.module = arch.module_for(spec.version)
        self.recurrence = recurrence_for(self.module, kernels)
        self.rescale_layer = plan.rescale_layer
        self.source = source
        self._tables = arch.token_tables(spec)
        self._layer_state, self._context_state = arch.state_names(spec)
        devices = {p.device for p in self.placements}
        self._graph = None
        # a captured step has fixed shapes and device-side inputs: not for growing caches or CPU-side tables
        self._graph_capable = (len(devices) == 1 and next(iter(devices)).startswith("cuda") and not self._tables
                               and not any(p.stream for p in self.placements)
                               and os.environ.get("RWKV_CONVERT_CUDA_GRAPH", "1") != "0")

    # ---- loading ---------------------------------------------------------------------------------
    def _place(self, i: int, lw: dict) -> dict:
        """Layer i's weights on its device; streamed layers keep their matrices in CPU memory and copy
        them in for each call. Per-token tables stay where they are (memory-mapped): rows are gathered."""
        p = self.placements[i]
        home = "cpu" if p.stream else p.device
        lora = getattr(self.module, "LORA_PARAMS", ())

        def placed(k: str, v):
            if k in self._tables:
                return v
            if _is_matrix(self.module, k):
                return held_for_cpu(v.to(home))
            if k in lora and p.device == "cpu":
                return held_lora_for_cpu(v, p.atype)
            return v.to(p.device)

        return {k: placed(k, v) for k, v in lw.items()}

    def _prepare(self, checkpoint: Checkpoint, preparation: Preparation) -> None:
        """Prepare and place every part; each part's file pages are dropped once it is made, so that the
        resident memory is the runner's weights, not the runner's weights plus the file."""
        def parts():
            done = ["emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias"]
            for i, lw in preparation.prepared_parts(checkpoint.tensors):
                if i < self.spec.n_layer:
                    yield i, lw
                    done = [k for k in checkpoint.shapes if k.startswith(f"blocks.{i}.")] + (done if i == 0 else [])
                else:
                    done = ["ln_out.weight", "ln_out.bias", "head.weight"]
                for name in done:
                    checkpoint.release(name)

        self.layers = [self._place(i, lw) for i, lw in parts()]
        p = preparation
        self._take(p.passes, p.ln0, p.emb, p.ln_out, p.head)

    def _take(self, applied: list[str], ln0, emb, ln_out: tuple, head) -> None:
        """The prepared embedding, ln0 (where it is left to the runner) and head onto their devices."""
        first, last = self.placements[0], self.placements[self.spec.n_layer]
        self.passes, self.ln0 = list(applied), ln0
        self.emb = emb.to(first.device)  # (a per-token ln0 fold keeps the file's table: on the CPU, as stored)
        self.ln_out = tuple(t.to(last.device) for t in ln_out)
        self.head = held_for_cpu(head.to(last.device))

    runner_name = "rwkv-convert runner"

    @property
    def weight_schemes(self) -> set[str]:
        """The precision of every slot's weights, as verification's tolerance table names them."""
        return {p.precision for p in self.placements}

    # ---- running ---------------------------------------------------------------------------------
    @property
    def state_per_layer(self) -> int:
        return len(self._layer_state)

    @property
    def state_names(self) -> list[str]:
        """Each state tensor's name, in the flat list's order."""
        names = [f"{name}.{i}" for i in range(self.spec.n_layer) for name in self._layer_state]
        return names + list(self._context_state)

    def init_state(self) -> list[torch.Tensor]:
        state: list[torch.Tensor] = []
        for i, lw in enumerate(self.layers):
            p = self.placements[i]
            state.extend(self.module.init_state(self.spec, lw, p.atype, p.device))
        if self._context_state:
            state.extend(self.module.init_context_state(self.spec, self.placements[0].device))
        return state

    @staticmethod
    def state_bytes(state: list[torch.Tensor]) -> int:
        """The state's size in bytes (DEA's grows with the context: see ModelSpec.constant_state)."""
        return sum(t.numel() * t.element_size() for t in state)

    def _check_tokens(self, tokens) -> list[int]:
        if isinstance(tokens, int):
            tokens = [tokens]
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.flatten().tolist()
        if not isinstance(tokens, Sequence) or len(tokens) == 0:
            raise RwkvConvertError("forward() needs a non-empty list of token ids")
        bad = [t for t in tokens if not isinstance(t, int) or not 0 <= t < self.spec.vocab_size]
        if bad:
            raise RwkvConvertError(f"token id {bad[0]!r} is outside the vocabulary (0..{self.spec.vocab_size - 1})")
        return list(tokens)

    def _check_state(self, state) -> list[torch.Tensor]:
        if not isinstance(state, (list, tuple)) or len(state) != len(self._state_template):
            n = len(state) if isinstance(state, (list, tuple)) else type(state).__name__
            extra = f" and {', '.join(self._context_state)}" if self._context_state else ""
            raise RwkvConvertError(
                f"state has {n} tensors; an RWKV-{self.spec.variant} model with {self.spec.n_layer} layers needs"
                f" {len(self._state_template)} ({', '.join(self._layer_state)} per layer{extra})")
        checked = []
        context = state[-1].shape[0] if self._context_state and isinstance(state[-1], torch.Tensor) else None
        for i, (t, (shape, dtype, device)) in enumerate(zip(state, self._state_template, strict=True)):
            # a growing state's first axis is the context's length: the same in every cache and the ids
            expected = (context, *shape[1:]) if shape and shape[0] == 0 else shape
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                per_layer, n_layered = self.state_per_layer, self.state_per_layer * self.spec.n_layer
                name = (f"{self._layer_state[i % per_layer]} of layer {i // per_layer}" if i < n_layered
                        else self._context_state[i - n_layered])
                raise RwkvConvertError(f"state[{i}] ({name}) has shape {got}, expected {expected}")
            checked.append(t.to(dtype=dtype, device=device))  # e.g. an fp32 state given to a bf16 model
        return checked

    def forward(self, tokens, state=None, full_output: bool = False):
        """Logits (fp32) of the last token, or of every token ([T, V]) with full_output, and the new
        state. The input state is not modified. One token on an all-GPU plan replays a captured CUDA graph."""
        tokens = self._check_tokens(tokens)
        state = self.init_state() if state is None else self._check_state(state)
        if len(tokens) == 1 and self._graph_capable:
            logits, state = self._graph_step(tokens[0], state)
        else:
            # inference_mode skips autograd bookkeeping on every op: ~1 ms per token on a 12-layer model.
            # The returned state tensors are inference tensors: clone() them before editing them in place.
            with torch.inference_mode():
                logits, state = self._run(torch.tensor(tokens, device=self.emb.device), state, full_output)
        return (logits if full_output else logits[0]), state

    def layer_context(self, ids: torch.Tensor, state: list) -> dict:
        """What every layer of one call shares besides x and its state: the recurrence, and for DeepEmbed/DEA the
        token ids, the embedding their tables fold in and (DEA) the context's ids, which join the state here."""
        ctx: dict = {"recurrence": self.recurrence}
        if self._tables:
            ctx.update(ids=ids, embed=lambda rows: self.embed(rows).float())
            if self._context_state:
                ctx["context_ids"] = torch.cat((state[-1].to(ids.device), ids))
                state[-1] = ctx["context_ids"]
        return ctx

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding (after ln0) of these token ids, in the first slot's activation dtype."""
        x = self.emb[ids]
        if self.ln0 is None:
            return x
        return layer_norm(x.to(self.ln0[0].dtype), *self.ln0).to(self.placements[0].atype)

    def _run(self, ids: torch.Tensor, state: list, full_output: bool):
        per_layer = self.state_per_layer
        x = self.embed(ids)
        ctx = self.layer_context(ids, state)
        for i, lw in enumerate(self.layers):
            p = self.placements[i]
            x = x.to(dtype=p.atype, device=p.device)
            if p.stream and p.device != "cpu":
                lw = {k: (v.to(p.device) if _is_matrix(self.module, k) else v) for k, v in lw.items()}
            layer_state = state[i * per_layer:(i + 1) * per_layer]
            x = self.module.layer_forward(lw, x, layer_state, ctx)
            state[i * per_layer:(i + 1) * per_layer] = layer_state
            if self.rescale_layer and (i + 1) % self.rescale_layer == 0:
                x = x / 2
        if not full_output:
            x = x[-1:]
        head = self.placements[self.spec.n_layer]
        x = x.to(dtype=head.atype, device=head.device)
        return self.head.matmul(layer_norm(x, *self.ln_out)).float(), state

    # ---- decoding through a CUDA graph -----------------------------------------------------------
    # A one-token step launches hundreds of small kernels; Python and launch overhead dominate it. On plans
    # whose every slot sits on one GPU (no streaming), the step is captured once with static input buffers
    # and replayed: per token, copy the token and the state in, replay, clone the outputs.
    def _graph_step(self, token: int, state: list):
        if self._graph is None:
            self._graph = self._capture()
        graph, ids, state_in, logits_out, state_out = self._graph
        with torch.inference_mode():
            ids.fill_(token)
            for dst, src in zip(state_in, state, strict=True):
                dst.copy_(src)
            graph.replay()
            return logits_out.clone(), [t.clone() for t in state_out]

    def _capture(self):
        with torch.inference_mode():
            ids = torch.zeros(1, dtype=torch.long, device=self.emb.device)
            state_in = [t.clone() for t in self.init_state()]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture: kernel builds, allocator pools
                for _ in range(2):
                    self._run(ids, list(state_in), False)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits, state_out = self._run(ids, list(state_in), False)
        return graph, ids, state_in, logits, state_out
