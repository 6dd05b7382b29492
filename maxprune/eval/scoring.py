"""Token log-probabilities under a model: jitted, sharded, one compilation per padded shape.

Perplexity, validation loss and every lm-eval request reduce to one question:
what log-probability does the model give each target token? `Scorer` answers it
for batches of variable-length sequences, two ways:

- `score_batch` right-pads sequences to one of a few bucket lengths (powers of
  two by default) and batches to a fixed row count; right padding is safe
  because attention is causal. Perplexity windows, all one length, go this way.
- `score_packed` packs many short sequences into each row, each attending
  only to itself, and the choices of one question as a tree over their shared
  context: lm-eval's loglikelihood requests go this way, on ~3x fewer tokens.

Either way XLA compiles a handful of shapes however many distinct request
lengths lm-eval produces; `compile_count` says how many.

The batch is sharded over the mesh's data x fsdp axes and the params keep the
sharding they were loaded with, so a model that only fits sharded evaluates
sharded. Results come back replicated, so every process of a multi-host job can
read them.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxprune import sharding
from maxprune.errors import MaxpruneError
from maxprune.model import llama
from maxprune.model.arch import Arch

LOGITS_BYTES = 1 << 30  # at most this much fp32 logits per packed call (a few rows at least)


def bucket_lengths(max_length: int, min_bucket: int = 32) -> tuple[int, ...]:
    """Powers of two from `min_bucket` up to `max_length` (which is always the last bucket)."""
    if max_length < 1 or min_bucket < 1:
        raise MaxpruneError(f"max_length={max_length} and min_bucket={min_bucket} must be >= 1")
    buckets, length = [], 1 << max(0, math.ceil(math.log2(min_bucket)))
    while length < max_length:
        buckets.append(length)
        length *= 2
    return (*buckets, max_length)


class Scorer:
    """`(inputs, targets) -> (log p(target_t | inputs_<=t), target_t is the argmax)` per position."""

    def __init__(self, arch: Arch, params, masks, mesh: Mesh, options: llama.ModelOptions,
                 batch_size: int, buckets: Sequence[int], batch_tokens: int | None = None):
        """At most `batch_size` sequences per call, and (if given) about `batch_tokens` tokens: long
        buckets get fewer rows, which bounds the [rows, length, vocab] logits in memory."""
        self.arch, self.params, self.masks, self.mesh, self.options = arch, params, masks, mesh, options
        self._shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.buckets = tuple(sorted(set(buckets)))
        self._compiled: dict[tuple, Callable] = {}

    @property
    def rows(self) -> int:
        """Rows per call at the shortest bucket: `batch_size` rounded up to the batch shards."""
        return self.rows_for(self.buckets[0])

    def rows_for(self, length: int) -> int:
        """Rows per call for sequences padded to `length`: a multiple of the batch shards."""
        rows = self.batch_size if not self.batch_tokens else min(self.batch_size, self.batch_tokens // length)
        return -(-max(rows, 1) // self._shards) * self._shards

    @property
    def compile_count(self) -> int:
        """Distinct (function, shapes) pairs compiled so far: per kind (score, logprob, next) at most
        one per bucket; packed calls per row length, power-of-two row count and scored positions."""
        return len(self._compiled)

    @property
    def max_length(self) -> int:
        return self.buckets[-1]

    def bucket(self, length: int) -> int:
        """The shortest bucket that holds `length` tokens."""
        for b in self.buckets:
            if length <= b:
                return b
        raise MaxpruneError(f"a sequence of {length} tokens exceeds the longest bucket {self.max_length}")

    # ------------------------------------------------------------ batched calls
    def score_batch(self, inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], greedy: bool = True
                    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per sequence: (logprob_T float32, is_greedy_T bool) for each of its targets.

        All are padded to the bucket of the longest one, `rows_for(bucket)` per call.
        `greedy=False` skips the argmax pass over the vocab (perplexity does not need it)
        and gives None for is_greedy.
        """
        length = self.bucket(max(len(x) for x in inputs))
        rows, out = self.rows_for(length), []
        for start in range(0, len(inputs), rows):
            chunk_tg = targets[start:start + rows]
            logprob_BL, greedy_BL = self._run("score" if greedy else "logprob", length,
                                              _pad(inputs[start:start + rows], rows, length),
                                              _pad(chunk_tg, rows, length))
            out += [(logprob_BL[i, :len(t)], None if greedy_BL is None else greedy_BL[i, :len(t)])
                    for i, t in enumerate(chunk_tg)]
        return out

    def score_packed(self, inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], tails: Sequence[int],
                     pack_length: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence: (logprob, is_greedy) of its last `tails[i]` targets, sequences packed.

        Sequences whose inputs agree up to their scored part (the choices of one
        multiple-choice question) become one tree: their shared context once, then
        each continuation, which sees the context and itself. Trees share rows of
        `bucket(max(pack_length, longest))` tokens (best fit, longest first), each
        attending only to itself with positions from 0, so every sequence scores as
        it would alone, on far fewer tokens than padding each to a power of two.
        Only scored positions go through the lm_head (a power-of-two bucket of the
        most any row holds). Calls hold `rows_for(length)` rows, fewer (a power of
        two of the shards) for what is left at the end, or when their fp32 logits
        would pass `LOGITS_BYTES` (a 128K vocab at 32 rows x 128 positions: 2 GiB).
        """
        length = self.bucket(max(pack_length, max(len(x) for x in inputs)))
        trees = _trees(inputs, tails, length)
        packed = [[trees[t] for t in row] for row in _pack([tree.size for tree in trees], length)]
        out, start = [None] * len(inputs), 0
        while start < len(packed):
            chunk, rows, tail = self._packed_call(packed[start:start + self.rows_for(length)], tails, length)
            arrays, slots = _packed_arrays(chunk, inputs, targets, tails, rows, length, tail)
            logprob_BT, greedy_BT = self._run("packed", length, *arrays)
            for i, (row, cols) in slots.items():
                out[i] = (logprob_BT[row, cols], greedy_BT[row, cols])
            start += len(chunk)
        return out

    def _packed_call(self, chunk: list[list[_Tree]], tails, length: int) -> tuple[list[list[_Tree]], int, int]:
        """The leading rows of `chunk` one call takes, its row count (a power of two times the
        shards) and its scored positions per row (a power of two, at least 8), halving the rows
        while their fp32 logits would pass `LOGITS_BYTES`."""
        while True:
            rows = min(self.rows_for(length), self._shards * _pow2_at_least(len(chunk) / self._shards))
            most = max(sum(tails[i] for tree in row for i in tree.members) for row in chunk)
            tail = min(length, max(8, _pow2_at_least(most)))
            if rows <= self._shards or rows * tail * self.arch.vocab_size * 4 <= LOGITS_BYTES:
                return chunk, rows, tail
            chunk = chunk[:rows // 2]

    def next_tokens(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """The greedy next token after each sequence."""
        length = self.bucket(max(len(x) for x in inputs))
        rows, out = self.rows_for(length), []
        for start in range(0, len(inputs), rows):
            chunk = inputs[start:start + rows]
            last_B = np.zeros(rows, np.int32)
            last_B[:len(chunk)] = [len(x) - 1 for x in chunk]
            out.append(self._run("next", length, _pad(chunk, rows, length), last_B)[:len(chunk)])
        return np.concatenate(out)

    # ------------------------------------------------------------ compilation
    def _run(self, kind: str, length: int, *arrays: np.ndarray):
        key = (kind, length) + tuple(a.shape for a in arrays)
        with sharding.use_mesh(self.mesh):
            device_arrays = [_to_global(a, self.mesh) for a in arrays]
            if key not in self._compiled:
                fn = {"score": _score_fn, "logprob": _logprob_fn, "next": _next_fn, "packed": _packed_fn}[kind]
                replicated = NamedSharding(self.mesh, PartitionSpec())
                jitted = jax.jit(lambda p, m, *xs: fn(p, m, *xs, arch=self.arch, options=self.options),
                                 out_shardings=replicated)
                self._compiled[key] = jitted.lower(self.params, self.masks, *device_arrays).compile()
            result = self._compiled[key](self.params, self.masks, *device_arrays)
        return jax.tree.map(np.asarray, result)


def _score_fn(params, masks, inputs_BL, targets_BL, *, arch, options):
    logits_BLV = llama.forward(params, inputs_BL, arch, masks, options)
    return _target_logprob(logits_BLV, targets_BL), jnp.argmax(logits_BLV, axis=-1) == targets_BL


def _logprob_fn(params, masks, inputs_BL, targets_BL, *, arch, options):
    return _target_logprob(llama.forward(params, inputs_BL, arch, masks, options), targets_BL), None


def _packed_fn(params, masks, inputs_BL, positions_BL, segments_BL, branches_BL, keep_BT, targets_BT, *,
               arch, options):
    logits_BTV = llama.forward(params, inputs_BL, arch, masks, options, positions_BL=positions_BL,
                               keep_BT=keep_BT, segments_BL=segments_BL, branches_BL=branches_BL)
    return _target_logprob(logits_BTV, targets_BT), jnp.argmax(logits_BTV, axis=-1) == targets_BT


@dataclasses.dataclass
class _Tree:
    """Sequences sharing `prefix` (their inputs before the scored part): `size` tokens packed."""
    prefix: np.ndarray
    members: list[int]
    size: int


def _trees(inputs, tails, capacity: int) -> list[_Tree]:
    """Group sequences by shared prefix, the inputs before their last `tail - 1` (a scored
    continuation's first target is predicted at the prefix's last position); a tree larger
    than `capacity` is split, each part repeating the prefix."""
    groups: dict[bytes, tuple[np.ndarray, list[int]]] = {}
    for i, x in enumerate(inputs):
        prefix = np.asarray(x[:len(x) - tails[i] + 1], np.int32)
        groups.setdefault(prefix.tobytes(), (prefix, []))[1].append(i)
    trees = []
    for prefix, members in groups.values():
        tree = _Tree(prefix, [], len(prefix))
        for i in members:
            if tree.members and tree.size + tails[i] - 1 > capacity:
                trees.append(tree)
                tree = _Tree(prefix, [], len(prefix))
            tree.members.append(i)
            tree.size += tails[i] - 1
        trees.append(tree)
    return trees


def _pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most `capacity` tokens: best fit, longest first."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted; rows too full for any item dropped
    smallest = min(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = bisect.bisect_left(free, (lengths[i], -1))
        if j == len(free):
            rows.append([i])
            room, row = capacity - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(j)
            rows[row].append(i)
            room -= lengths[i]
        if room >= smallest:
            bisect.insort(free, (room, row))
    return rows


def _packed_arrays(chunk: list[list[_Tree]], inputs, targets, tails, rows: int, length: int, tail: int):
    """The arrays of `_packed_fn` for rows of trees, and where each sequence's scored targets
    land: {index: (row, columns)}. A tree is its prefix (branch 0), then each member's
    continuation inputs (branch 1, 2, ...); member i's first target sits at the prefix's
    last position, the rest at its own continuation's positions."""
    inputs_BL, keep_BT, targets_BT = (np.zeros((rows, n), np.int32) for n in (length, tail, tail))
    positions_BL = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    segments_BL = np.zeros((rows, length), np.int32)  # 0: padding, which attends only to padding
    branches_BL = np.zeros((rows, length), np.int32)
    slots = {}
    for row, trees in enumerate(chunk):
        offset = kept = 0
        for segment, tree in enumerate(trees, start=1):
            p = len(tree.prefix)
            inputs_BL[row, offset:offset + p], positions_BL[row, offset:offset + p] = tree.prefix, np.arange(p)
            segments_BL[row, offset:offset + tree.size] = segment
            end = offset + p
            for branch, i in enumerate(tree.members, start=1):
                n, t = len(inputs[i]), tails[i]
                inputs_BL[row, end:end + t - 1] = inputs[i][n - t + 1:]
                positions_BL[row, end:end + t - 1] = np.arange(p, p + t - 1)
                branches_BL[row, end:end + t - 1] = branch
                keep_BT[row, kept:kept + t] = [offset + p - 1, *range(end, end + t - 1)]
                targets_BT[row, kept:kept + t] = targets[i][-t:]
                slots[i] = (row, slice(kept, kept + t))
                end, kept = end + t - 1, kept + t
            offset += tree.size
    return (inputs_BL, positions_BL, segments_BL, branches_BL, keep_BT, targets_BT), slots


def _pow2_at_least(x: float) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, math.ceil(math.log2(x)))


def _target_logprob(logits_BLV, targets_BL):
    """log softmax(logits)[target], without materialising the full log-softmax."""
    logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    return jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0] - logz_BL


def _next_fn(params, masks, inputs_BL, last_B, *, arch, options):
    logits_BLV = llama.forward(params, inputs_BL, arch, masks, options)
    last_BV = jnp.take_along_axis(logits_BLV, last_B[:, None, None], axis=1)[:, 0]
    return jnp.argmax(last_BV, axis=-1).astype(jnp.int32)


def _pad(seqs: Sequence[np.ndarray], rows: int, length: int) -> np.ndarray:
    """[rows, length] int32, zero-padded on the right and below."""
    out_BL = np.zeros((rows, length), np.int32)
    for i, s in enumerate(seqs):
        out_BL[i, :len(s)] = s
    return out_BL


def _to_global(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array (identical on every process) as a global array, batch over data x fsdp."""
    spec = sharding.batch_sharding(mesh, x.ndim)
    return jax.make_array_from_callback(x.shape, spec, lambda index: x[index])
