"""`Arch`: the dimensions of a Llama model, its parameter count and FLOPs.

The parameter count follows the paper's Table 1: embeddings and lm_head are
counted (lm_head once more unless tied); for sparse models only the
non-zero weights of the seven prunable kernels are counted.

Forward FLOPs follow the paper's Table 9: per sequence of S tokens,
``2 · (non-embedding params incl. lm_head) · S + 4 · S² · H · head_dim`` per
layer (full, non-causal attention). `train_flops_per_token` is three times the
forward (forward + backward), which is what MFU is measured against.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from maxprune.errors import MaxpruneError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 RoPE frequency scaling ("llama3" rope_type in HF)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class Arch:
    """Dimensions of a Llama-3 style decoder. `head_dim` is independent of `hidden_size`."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    out_bias: bool = False  # o_proj / down_proj biases (FLAP's bias compensation)
    max_position_embeddings: int = 131072

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "ffn_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MaxpruneError(f"arch.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise MaxpruneError(
                f"arch.num_heads={self.num_heads} is not divisible by "
                f"arch.num_kv_heads={self.num_kv_heads}; query heads must split evenly "
                f"into KV groups")
        if self.head_dim % 2:
            raise MaxpruneError(f"arch.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise MaxpruneError(f"arch.rope_theta must be > 0, got {self.rope_theta}")
        if not self.norm_eps > 0:
            raise MaxpruneError(f"arch.norm_eps must be > 0, got {self.norm_eps}")

    # ------------------------------------------------------------ derived dims
    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    # ---------------------------------------------------------- param counting
    def prunable_params_per_layer(self) -> int:
        """Weights of the seven prunable kernels (q, k, v, o, gate, up, down) of one layer."""
        d = self.hidden_size
        attn = d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d
        mlp = 3 * d * self.ffn_size
        return attn + mlp

    def num_prunable_params(self) -> int:
        return self.num_layers * self.prunable_params_per_layer()

    def layer_params(self) -> int:
        """All parameters of one decoder layer: kernels, two norms, optional biases."""
        extra = 2 * self.hidden_size + (2 * self.hidden_size if self.out_bias else 0)
        return self.prunable_params_per_layer() + extra

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    def num_params(self, *, sparsity: float = 0.0, embeddings: bool = True) -> int:
        """Parameter count as the paper's Table 1 counts it.

        `sparsity` is the fraction of zeros in the prunable kernels (Wanda,
        SparseGPT); only non-zeros are counted. `embeddings=False` drops the
        input embedding (lm_head stays, as in Table 9's FLOP count).
        """
        if not 0.0 <= sparsity < 1.0:
            raise MaxpruneError(f"sparsity must be in [0, 1), got {sparsity}")
        dense_rest = self.num_layers * (self.layer_params() - self.prunable_params_per_layer())
        kernels = round(self.num_prunable_params() * (1.0 - sparsity))
        total = kernels + dense_rest + self.hidden_size + self.lm_head_params()
        if embeddings or self.tie_embeddings:
            # A tied table is also the lm_head, so it always counts once.
            total += self.embedding_params()
        return total

    # ------------------------------------------------------------------- FLOPs
    def forward_flops(self, seq_len: int, *, causal: bool = False) -> float:
        """Forward FLOPs of one sequence (Table 9 convention with `causal=False`)."""
        # Kernels + lm_head (a tied table counts once, as the lm_head matmul).
        matmul_params = self.num_params(embeddings=False) - self._norm_and_bias_params()
        attn = 4 * seq_len * seq_len * self.num_heads * self.head_dim * self.num_layers
        if causal:
            attn /= 2
        return 2.0 * matmul_params * seq_len + attn

    def train_flops_per_token(self, seq_len: int, *, causal: bool = True) -> float:
        """Forward + backward FLOPs per token (3× forward), for MFU."""
        return 3.0 * self.forward_flops(seq_len, causal=causal) / seq_len

    def _norm_and_bias_params(self) -> int:
        per_layer = self.layer_params() - self.prunable_params_per_layer()
        return self.num_layers * per_layer + self.hidden_size

    # ------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Arch":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MaxpruneError(
                f"unknown Arch field(s) {unknown}; valid fields: {sorted(known)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in data)
        if missing:
            raise MaxpruneError(f"Arch is missing required field(s) {missing}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes) -> "Arch":
        return dataclasses.replace(self, **changes)


LLAMA31_ROPE = RopeScaling()

PRESETS: dict[str, Arch] = {
    "llama3.1-8b": Arch(
        vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, ffn_size=14336, rope_theta=500000.0,
        rope_scaling=LLAMA31_ROPE, norm_eps=1e-5),
    # A ~1 B Llama-3 style model for accelerator step-time checks.
    "llama-1b": Arch(
        vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, ffn_size=8192, rope_theta=500000.0,
        rope_scaling=LLAMA31_ROPE, norm_eps=1e-5, tie_embeddings=True),
    # Tiny shapes for tests and the CPU demo.
    "tiny": Arch(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, ffn_size=192, rope_theta=10000.0,
        max_position_embeddings=2048),
    "tiny-llama31": Arch(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=32, ffn_size=192, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64),
        max_position_embeddings=2048),
}


def preset(name: str) -> Arch:
    if name not in PRESETS:
        raise MaxpruneError(f"unknown arch preset {name!r}; valid presets: {sorted(PRESETS)}")
    return PRESETS[name]
