"""The one table of storage types (like gguf-py's constants.py): for every way a weight matrix can be stored,
its bits per weight, its name in each format and in strategy strings, the runtimes that run it, and the
verification bound it is judged by, with the reason. Writers, runtimes, verify and quality look words up
here; an unknown word fails here, listing the known ones.

Words (docs/architecture.md, "One vocabulary"): a *dtype* is a float storage type (fp32, fp16, bf16); a *quant*
is an integer or block storage type (the pip package's i8, GGUF's blocks, ONNX's MatMulNBits blocks); a
*bound* is the verification class a storage type is judged in (several GGUF block types share "q5/q4"); a
*quality scheme* is one row of `rwkv-convert quality` (a format with its options)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import RwkvConvertError

OURS, PIP, LLAMA, ORT, HF, MLX = "ours", "rwkv pip package", "llama.cpp", "onnxruntime", "transformers", "mlx-lm"


@dataclass(frozen=True)
class Bound:
    """How far a candidate stored this way may be from the fp32 reference (verify.py widens it per model)."""
    max_abs: float  # max |Δlogit|
    rel_l2: float  # ||Δ|| / ||reference|| over all positions
    kl: float  # mean KL(reference || candidate) of the softmax, nats
    top1: float  # minimum share of positions whose argmax agrees
    reason: str


# Keyed by the least precise part of the candidate's plan. Measured on the fixtures (7 layers, logits of magnitude
# ~13, 2 x 64 tokens, v4-v7), worst case in the reason; bounds leave about 3x room.
BOUNDS: dict[str, Bound] = {
    "fp32": Bound(1e-3, 1e-4, 1e-6, 0.99,
                  "same math in fp32, only summation order differs: measured max |Δ| <= 4e-5"),
    "fp16": Bound(0.5, 0.01, 1e-3, 0.95,
                  "fp16 (10-bit mantissa; v4-v6 rescaled every 6 layers): measured max |Δ| 0.2 (v7), rel L2 0.0034;"
                  " web-rwkv (fp16 weights and activations) on random v6 at L7 C128 and L12 C384: 0.21 and 0.5 of"
                  " this bound (rel L2), v4-v6 fixtures max |Δ| <= 0.08, KL <= 3e-5"),
    "bf16": Bound(1.0, 0.05, 0.01, 0.85,
                  "bf16 (7-bit mantissa): measured max |Δ| 0.33, rel L2 0.017, KL 0.0012, top-1 95%"),
    "i8": Bound(1.0, 0.05, 0.01, 0.85,
                "int8 weights, row+column scales, fp32/fp16 activations: measured max |Δ| 0.34, rel L2 0.016,"
                " KL 0.0011, top-1 92%"),
    "bf16i8": Bound(3.0, 0.15, 0.05, 0.75,
                    "int8 weights with bf16 activations and scales: measured max |Δ| 1.4, rel L2 0.065, KL 0.018,"
                    " top-1 88%"),
    "q8_0": Bound(5.0, 0.1, 0.05, 0.9,
                  "GGUF Q8_0 (blocks of 32, one fp16 scale; llama.cpp also quantizes activations): measured on"
                  " the fixtures rel L2 <= 0.057, KL <= 0.02, top-1 92-100% per 64-token stream and 94.5-96.9%"
                  " pooled over 8 streams (flips at reference top-2 margins <= 0.5), max |Δ| <= 1.1 in"
                  " llama.cpp and one 3.2 outlier in our fp32 reader (v7 bf16: Q8_0 of the embedding alone"
                  " moves a logit by 2.7 in that random model)"),
    "int8-block": Bound(4.0, 0.1, 0.02, 0.85,
                        "ONNX int8 (onnxruntime MatMulNBits, blocks of 32 along K with zero points, int8"
                        " activations: accuracy_level 4): measured on the v4-v7 fixtures max |Δ| <= 1.8,"
                        " rel L2 <= 0.036, KL <= 0.0061, top-1 >= 92%"),
    "int4-block": Bound(15.0, 0.6, 1.0, 0.35,
                        "ONNX int4 (MatMulNBits, blocks of 32 with zero points): measured on the v4-v7 fixtures"
                        " max |Δ| <= 6.9, rel L2 <= 0.29, KL <= 0.33, top-1 >= 55% (random 7-layer models are"
                        " far more sensitive to weight noise than trained ones)"),
    "q5/q4": Bound(15.0, 0.6, 1.0, 0.35,
                   "GGUF 4-6 bit blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, and the mixes of them):"
                   " measured on the 7-layer random v5.2 and v6 fixtures in llama.cpp rel L2 <= 0.23, KL <= 0.36"
                   " (Q4_0; Q4_K and Q5_K <= 0.08), top-1 of all positions >= 53%; on the trained models KL"
                   " <= 0.034"),
    "q3/q2": Bound(30.0, 1.2, 3.0, 0.2,
                   "GGUF 2-3 bit K blocks (Q3_K and Q2_K, and the mixes of them): on the trained v7 llama.cpp's"
                   " Q3_K_M KL 0.075, rel L2 0.049; Q2_K KL 0.22, rel L2 0.11 (the noise baseline is what keeps"
                   " these honest)"),
}
# From the most precise to the least: a plan that mixes storage types is judged by its last one here.
BOUND_ORDER = ("fp32", "fp16", "bf16", "i8", "int8-block", "bf16i8", "q8_0", "int4-block", "q5/q4", "q3/q2")


@dataclass(frozen=True)
class StorageType:
    name: str  # our one word for it
    summary: str
    bits: float  # bits per weight of a large matrix, block scales included where the format fixes their type
    bound: str  # its key in BOUNDS
    runtimes: tuple[str, ...]  # the runtimes that run files storing it
    gguf: str | None = None  # the GGML type name
    onnx: str | None = None  # its --dtype / --onnx-quant word in ONNX exports
    strategy: str | None = None  # its weights word in a strategy string's placements (Placement.precision)
    torch_dtype: str | None = None  # the torch / safetensors dtype name of a float type
    mlx: str | None = None  # its --dtype / --quant word in MLX exports


_K = (OURS, LLAMA)  # GGUF blocks run in llama.cpp and in our reader (dequantized)
STORAGE: tuple[StorageType, ...] = (
    StorageType("fp32", "32-bit floats", 32, "fp32", (OURS, PIP, LLAMA, ORT, HF, MLX), "F32", "fp32", "fp32", "float32",
                "fp32"),
    StorageType("fp16", "16-bit floats", 16, "fp16", (OURS, PIP, LLAMA, ORT, HF, MLX), "F16", "fp16", "fp16", "float16",
                "fp16"),
    StorageType("bf16", "bfloat16", 16, "bf16", (OURS, PIP, LLAMA, HF, MLX), "BF16", None, "bf16", "bfloat16", "bf16"),
    StorageType("i8", "the pip package's int8 (row and column scales), fp32/fp16 activations", 8, "i8", (OURS, PIP),
                strategy="i8"),
    StorageType("bf16i8", "the pip package's int8 with bf16 activations and scales", 8, "bf16i8", (OURS, PIP),
                strategy="bf16i8"),
    StorageType("q8_0", "GGUF Q8_0: blocks of 32, one fp16 scale", 8.5, "q8_0", _K, "Q8_0"),
    StorageType("q6_k", "GGUF Q6_K: 6-bit super-blocks of 256", 6.5625, "q5/q4", _K, "Q6_K"),
    StorageType("q5_1", "GGUF Q5_1: blocks of 32, scale and minimum", 6, "q5/q4", _K, "Q5_1"),
    StorageType("q5_0", "GGUF Q5_0: blocks of 32, one scale", 5.5, "q5/q4", _K, "Q5_0"),
    StorageType("q5_k", "GGUF Q5_K: 5-bit super-blocks of 256", 5.5, "q5/q4", _K, "Q5_K"),
    StorageType("q4_1", "GGUF Q4_1: blocks of 32, scale and minimum", 5, "q5/q4", _K, "Q4_1"),
    StorageType("q4_0", "GGUF Q4_0: blocks of 32, one scale", 4.5, "q5/q4", _K, "Q4_0"),
    StorageType("q4_k", "GGUF Q4_K: 4-bit super-blocks of 256", 4.5, "q5/q4", _K, "Q4_K"),
    StorageType("q3_k", "GGUF Q3_K: 3-bit super-blocks of 256", 3.4375, "q3/q2", _K, "Q3_K"),
    StorageType("q2_k", "GGUF Q2_K: 2-bit super-blocks of 256", 2.625, "q3/q2", _K, "Q2_K"),
    # ONNX's block scales take the export's dtype: bits count the weights alone
    StorageType("int8-block", "ONNX MatMulNBits int8: blocks of 32 with zero points", 8, "int8-block", (ORT,),
                onnx="int8"),
    StorageType("int4-block", "ONNX MatMulNBits int4: blocks of 32 with zero points", 4, "int4-block", (ORT,),
                onnx="int4"),
    # MLX's affine groups (mlx.core.quantize): a scale and a bias in the model's dtype per group of --group-size
    StorageType("mlx-q8", "MLX affine 8-bit groups (scale and bias per group)", 8, "q8_0", (MLX, OURS), mlx="q8"),
    StorageType("mlx-q6", "MLX affine 6-bit groups (scale and bias per group)", 6, "q5/q4", (MLX, OURS), mlx="q6"),
    StorageType("mlx-q4", "MLX affine 4-bit groups (scale and bias per group)", 4, "q5/q4", (MLX, OURS), mlx="q4"),
    StorageType("mlx-q3", "MLX affine 3-bit groups (scale and bias per group)", 3, "q3/q2", (MLX, OURS), mlx="q3"),
)


def _known(column: str) -> list[str]:
    return [getattr(s, column) for s in STORAGE if getattr(s, column)]


def _lookup(column: str, word: str, what: str) -> StorageType:
    for s in STORAGE:
        if getattr(s, column) == word:
            return s
    raise RwkvConvertError(f"unknown {what} {word!r}; rwkv-convert's precision table knows {', '.join(_known(column))}")


def storage(name: str) -> StorageType:
    """The storage type of our word for it."""
    return _lookup("name", name, "storage type")


def by_gguf(type_name: str) -> StorageType:
    """The storage type of a GGML tensor type name (Q4_K)."""
    return _lookup("gguf", type_name, "GGUF tensor type")


def by_onnx(word: str) -> StorageType:
    """The storage type of an ONNX export's dtype or quant word (fp16, int4)."""
    return _lookup("onnx", word, "ONNX storage")


def float_bound(dtype_name: str) -> str:
    """The bound of weights stored in a float dtype (torch's name); floats wider than fp32 (float64) count as fp32."""
    name = dtype_name.removeprefix("torch.")
    return next((s.bound for s in STORAGE if s.torch_dtype == name), "fp32")


_FLOATS = ("fp32", "fp16", "bf16")


def onnx_dtypes() -> tuple[str, ...]:
    """ONNX --dtype's words: the float types ONNX exports store."""
    return tuple(s.onnx for s in STORAGE if s.onnx and s.bound in _FLOATS)


def onnx_quants() -> tuple[str, ...]:
    """--onnx-quant's words (besides none): the block types ONNX exports store."""
    return tuple(s.onnx for s in STORAGE if s.onnx and s.bound not in _FLOATS)


def mlx_quants() -> tuple[str, ...]:
    """MLX --quant's words (besides none)."""
    return tuple(s.mlx for s in STORAGE if s.mlx and s.bound not in _FLOATS)


def by_mlx(word: str) -> StorageType:
    """The storage type of an MLX export's dtype or quant word (bf16, q4)."""
    return _lookup("mlx", word, "MLX storage")


def no_counterpart(word: str, column: str, where: str, choices: tuple) -> str | None:
    """The refusal of a storage type the table knows (by any of its names) that `where` (a format's option, whose
    words are the table's `column`) cannot store: what it is, what the option takes, where it runs. None for
    words the table does not know, or that the column has."""
    word_l = word.lower()
    s = next((s for s in STORAGE if word_l in (s.name, (s.gguf or "").lower(), s.onnx, s.strategy, s.mlx)), None)
    if s is None or getattr(s, column):
        return None
    return (f"{word!r} is {s.summary}, which {where} cannot store: it takes {', '.join(map(str, choices))}"
            f" ({s.name} runs in {', '.join(s.runtimes)})")


def bound(name: str) -> Bound:
    """The bound of a bound key (fp32 ... q3/q2), or one line listing them."""
    if name not in BOUNDS:
        raise RwkvConvertError(f"unknown bound {name!r}; rwkv-convert's precision table has {', '.join(BOUND_ORDER)}")
    return BOUNDS[name]


def least_precise(bounds: set[str]) -> tuple[str, Bound]:
    """The bound key a plan mixing these is judged by, and its bound (an unknown key: one line, from bound())."""
    return max(((name, bound(name)) for name in bounds), key=lambda known: BOUND_ORDER.index(known[0]))


assert set(BOUND_ORDER) == set(BOUNDS) and {s.bound for s in STORAGE} <= set(BOUNDS)
