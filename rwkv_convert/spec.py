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
    deep_embed: bool = False
    # v5.x/v6 store the bonus either as u itself (`time_faaaa`) or as log(u) (`time_first`, v5.0/5.1).
    bonus_is_log: bool = False
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype name -> number of tensors
    n_params: int = 0

    @property
    def major(self) -> int:
        return int(float(self.version))

    def to_dict(self) -> dict:
        return asdict(self)
