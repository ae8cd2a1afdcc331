"""ModelSpec: everything about a checkpoint's architecture, read from its tensor names and shapes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    version: str  # "4", "5.0", "5.1", "5.2", "6", "7"
    n_layer: int
    n_embd: int
    vocab_size: int
    ffn_dim: int
    att_dim: int
    head_size: int | None  # None for v4, which has no heads
    n_head: int | None
    lora_ranks: dict[str, int] = field(default_factory=dict)
    time_state: bool = False
    deep_embed: bool = False  # RWKV-7 "7a": a per-token table modulates each FFN (ffn.s_emb)
    dea: bool = False  # RWKV-7 "7b": DeepEmbed plus a small causal attention beside each time mix (qkv.*)
    # widths of the variant's parts, read from the file: deep_embed (s1's), dea_query (qq's), dea_cache (k1's)
    variant_dims: dict[str, int] = field(default_factory=dict)
    table_params: int = 0  # parameters in per-token tables (rows read per token, kept memory-mapped)
    # v5.x/v6 store the bonus either as u itself (`time_faaaa`) or as log(u) (`time_first`, v5.0/5.1).
    bonus_is_log: bool = False
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype name -> number of tensors
    n_params: int = 0

    @property
    def variant(self) -> str:
        """The released name's letter: "7a" (DeepEmbed), "7b" (DeepEmbed + DEA), else the version."""
        return "7b" if self.dea else "7a" if self.deep_embed else self.version

    @property
    def constant_state(self) -> bool:
        """False where the state grows with the context (DEA's caches)."""
        return not self.dea

    @property
    def major(self) -> int:
        return int(float(self.version))

    def to_dict(self) -> dict:
        return asdict(self)
