"""The reference runner: a prepared RWKV model of any version, executed with plain torch ops.

Sequence mode batches every projection over the T tokens; only each version's recurrence walks the
tokens one by one. State is a flat list in the `rwkv` pip package's layout."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import arch, passes
from .arch.common import PROJECTIONS_KEY, as_vector, layer_norm
from .checkpoint import Checkpoint
from .cpu import ops as cpu_ops
from .cuda import on_cpu as cuda_on_cpu
from .cuda import ops as cuda_ops
from .errors import RwkvConvertError
from .plan import Plan, make_plan
from .quant import held_for_cpu, held_lora_for_cpu, scheme_for
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
    """The version's recurrence: its torch code, or ("auto") the native kernel for the tensors' device (CUDA,
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


LN0_FOLDS = ("fp32", "package")


class Model:
    """A runnable RWKV model. `forward(tokens, state=None, full_output=False) -> (logits, state)`."""

    def __init__(self, checkpoint: Checkpoint, strategy: str | Strategy | Plan = "cpu fp32",
                 rescale_layer: int | None = None, skip_passes: tuple[str, ...] = (), kernels: str = "auto",
                 ln0_fold: str = "fp32"):
        """strategy: a strategy string, or the Plan of one on this checkpoint (plan.make_plan: what
        `rwkv-convert plan` prints is what runs). skip_passes: optional passes to leave out (passes.FOLD_LN0,
        passes.STACK), for comparisons; the rescale is set with rescale_layer (0 = none; a Plan has its own),
        since forward() halves x to match it. kernels: "auto" (the kernels: CUDA on GPU tensors, C on the
        CPU), "torch" (the torch code everywhere) or "cuda-on-cpu" (the recurrences through the CUDA kernels' CPU
        build, for tests: docs/cuda.md). ln0_fold: "fp32" (ours, the accurate one) or "package" (as the pip package
        folds it: v4-v6 in the file's dtype, v7 in the strategy's; see docs/numerics.md)."""
        if ln0_fold not in LN0_FOLDS:
            raise RwkvConvertError(f"unknown ln0 fold {ln0_fold!r}; choose from {', '.join(LN0_FOLDS)}")
        self._ln0_fold = ln0_fold
        plan = strategy if isinstance(strategy, Plan) else \
            make_plan(checkpoint.spec, checkpoint.shapes, strategy, rescale_layer)
        self._setup(checkpoint.spec, plan, checkpoint.path, kernels)
        self._ln0_per_token = ln0_fold == "fp32" and self.placements[0].device == "cpu"
        unknown = set(skip_passes) - {passes.FOLD_LN0, passes.STACK}
        if unknown:
            raise ValueError(f"cannot skip {sorted(unknown)}: only {passes.FOLD_LN0} and {passes.STACK} are optional")
        self._skip, self._quantizer = set(skip_passes), None
        self._prepare(checkpoint)
        self._state_template = [(tuple(t.shape), t.dtype, t.device) for t in self.init_state()]

    @classmethod
    def unprepared(cls, checkpoint: Checkpoint, strategy: str | Strategy, quantizer=None) -> Model:
        """A model whose weights are not prepared yet: iterating `prepared_parts(checkpoint.tensors)` prepares
        them part by part (for writers of prepared files, which store each layer as it is made). quantizer:
        None, or a function (our key, the matrix as prepared [out, in], its Placement) -> the weight to use
        instead of the slot's scheme's, or None to leave the matrix to the scheme."""
        model = cls.__new__(cls)
        model._setup(checkpoint.spec, make_plan(checkpoint.spec, checkpoint.shapes, strategy), checkpoint.path)
        model._skip, model._ln0_fold, model._quantizer = set(), "fp32", quantizer
        return model

    def _quantize(self, key: str, weight: torch.Tensor, placement: Placement):
        chosen = self._quantizer(key, weight, placement) if self._quantizer is not None else None
        return chosen if chosen is not None else scheme_for(placement.weights).quantize(weight, placement.atype)

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
        self._ln0_per_token = False  # Model() sets it: writers of files and prepared models fold the table
        self._tables = arch.token_tables(spec)
        self._layer_state, self._context_state = arch.state_names(spec)
        devices = {p.device for p in self.placements}
        self._graph = None
        # a captured step has fixed shapes and device-side inputs: not for growing caches or CPU-side tables
        self._graph_capable = (len(devices) == 1 and next(iter(devices)).startswith("cuda") and not self._tables
                               and not any(p.stream for p in self.placements)
                               and os.environ.get("RWKV_CONVERT_CUDA_GRAPH", "1") != "0")

    @classmethod
    def from_prepared(cls, spec: ModelSpec, strategy: str | Strategy, rescale_layer: int, source, emb: torch.Tensor,
                      layers: list[dict], ln_out: tuple, head, applied: list[str]) -> Model:
        """A model from weights already transformed for the runner (e.g. read from a converted file)."""
        model = cls.__new__(cls)
        model._setup(spec, make_plan(spec, None, strategy, rescale_layer), source)
        model.passes, model.ln0 = list(applied), None
        model.emb = emb.to(model.placements[0].device)
        model.layers = [model._place(i, lw) for i, lw in enumerate(layers)]
        head_place = model.placements[spec.n_layer]
        model.ln_out = tuple(t.to(head_place.device) for t in ln_out)
        model.head = held_for_cpu(head.to(head_place.device))
        model._state_template = [(tuple(t.shape), t.dtype, t.device) for t in model.init_state()]
        return model

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

    def _prepare(self, checkpoint: Checkpoint) -> None:
        """Prepare and place every part; each part's file pages are dropped once it is made, so that the
        resident memory is the runner's weights, not the runner's weights plus the file."""
        self.layers: list[dict] = []
        done = ["emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias"]
        for i, lw in self.prepared_parts(checkpoint.tensors):
            if i < self.spec.n_layer:
                self.layers.append(self._place(i, lw))
                done = [k for k in checkpoint.shapes if k.startswith(f"blocks.{i}.")] + (done if i == 0 else [])
            else:
                done = ["ln_out.weight", "ln_out.bias", "head.weight"]
            for name in done:
                checkpoint.release(name)
        self.head = held_for_cpu(self.head)

    def prepared_parts(self, tensors: dict[str, torch.Tensor]):
        """Prepare the weights part by part: sets self.passes, self.ln0, self.emb, self.ln_out, self.head and
        yields (i, layer i's weights) for each layer, then (n_layer, {}) once the head is ready. Writers of
        prepared files consume it one layer at a time."""
        spec, module, skip = self.spec, self.module, self._skip
        first, head = self.placements[0], self.placements[spec.n_layer]
        self.passes: list[str] = []

        def record(name: str) -> None:
            if name not in self.passes:
                self.passes.append(name)

        def ran(name: str) -> bool:
            if name in skip:
                return False
            record(name)
            return True

        with torch.no_grad():
            # ln0 is folded into the embedding table in fp32 (the pip package does it in the file's dtype
            # for v4-v6, so bf16 files give it a bf16-rounded table; see docs/numerics.md). A model run on the
            # CPU applies the same fp32 fold to each token's row as it is read instead: the table stays as
            # stored, memory-mapped, and is never copied (a 65536x768 bf16 table would take 201 MB as fp32).
            self.ln0 = None
            if self._ln0_per_token and passes.FOLD_LN0 not in skip:
                record(passes.FOLD_LN0)
                self.ln0 = tuple(tensors[f"blocks.0.ln0.{n}"].float() for n in ("weight", "bias"))
                self.emb = tensors["emb.weight"]
            else:
                if ran(passes.FOLD_LN0):
                    fold_dtype = torch.float32
                    if self._ln0_fold == "package":
                        fold_dtype = tensors["emb.weight"].dtype if module.PIP_LN0_FOLD == "file" else first.atype
                    tensors = passes.fold_ln0(tensors, fold_dtype)
                else:
                    self.ln0 = tuple(tensors[f"blocks.0.ln0.{n}"].to(first.atype).to(first.device)
                                     for n in ("weight", "bias"))
                self.emb = tensors["emb.weight"].to(first.atype).to(first.device)
            for i in range(spec.n_layer):
                p = self.placements[i]
                prefix = f"blocks.{i}."
                lw = {k[len(prefix):]: v for k, v in tensors.items()
                      if k.startswith(prefix) and not k.startswith(prefix + "ln0.")}
                for name, t in lw.items():
                    if name in self._tables:
                        continue  # kept as stored: rows are read per token (arch.v7.token_rows)
                    if name not in module.MATRICES:
                        dtype = torch.float32 if name in module.FP32_PARAMS else p.atype
                        lw[name] = as_vector(t).to(dtype)
                if self.rescale_layer:
                    record(passes.RESCALE)
                    lw = passes.rescale_for_fp16(lw, i, self.rescale_layer)
                for name in module.MATRICES:
                    if name in lw:
                        lw[name] = self._quantize(prefix + name, lw[name], p)
                record(passes.DECAY)  # the runner's math expects it: it always runs
                lw = passes.precompute_decay(lw, module, spec, i)
                if passes.STACK not in skip:
                    lw = passes.stack_projections(lw, module.PROJECTIONS)
                    if PROJECTIONS_KEY in lw:  # float layers only
                        record(passes.STACK)
                yield i, lw
            self.ln_out = (tensors["ln_out.weight"].to(head.atype).to(head.device),
                           tensors["ln_out.bias"].to(head.atype).to(head.device))
            self.head = self._quantize("head.weight", tensors["head.weight"], head).to(head.device)
            yield spec.n_layer, {}

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
