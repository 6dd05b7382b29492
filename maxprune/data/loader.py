"""The training input pipeline: a grain pipeline over a prepared dataset's packed sequences.

Why it is built this way:
- The pipeline shuffles *positions* in the union of the budget's sequence ranges
  (grain's index shuffle: no permutation array, O(1) memory at any corpus size),
  repeats them for the requested epochs (grain reseeds every epoch), slices to the
  exact number of sequences, and groups them into *global* batches. Every process
  computes the same global batch of positions and reads only its own rows, so the
  processes' local batches, concatenated in process order, are exactly the global
  batch one process would see — the data order does not depend on the host count.
- Everything above the read is a grain `MapDataset`, so the iterator's state is
  just the next global-batch index: a checkpoint is a few bytes of JSON, a resumed
  loader yields exactly what an uninterrupted one would, and a run can even resume
  on a different number of hosts.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from maxprune.config import at_least
from maxprune.errors import MaxpruneError

STATE_VERSION = 1


class RangeUnion(Sequence):
    """Positions 0..n-1 over the union of ``[start, end)`` sequence ranges, lazily.

    A budget of hundreds of millions of sequences needs no index array: position ->
    sequence id is a bisect over the ranges' cumulative lengths.
    """

    def __init__(self, ranges: Sequence[tuple[int, int]]):
        self.ranges = [(int(start), int(end)) for start, end in ranges]
        self._offsets = np.cumsum([0] + [end - start for start, end in self.ranges]).tolist()

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, position: int) -> int:
        if not 0 <= position < len(self):
            raise IndexError(position)
        k = bisect.bisect_right(self._offsets, position) - 1
        return self.ranges[k][0] + position - self._offsets[k]


def check_ranges(ranges: Sequence[tuple[int, int]], num_sequences: int) -> list[tuple[int, int]]:
    """The ranges as int pairs, or MaxpruneError if one is empty, out of bounds or overlaps another.

    Overlaps are refused because budgets are disjoint by design: an overlap would
    silently train on some sequences twice per epoch.
    """
    pairs = [(int(start), int(end)) for start, end in ranges]
    if not pairs:
        raise MaxpruneError("ranges is empty: give at least one (start_seq, end_seq) range")
    for start, end in pairs:
        if not 0 <= start < end <= num_sequences:
            raise MaxpruneError(f"sequence range ({start}, {end}) must satisfy "
                                f"0 <= start < end <= {num_sequences} (the dataset's sequences)")
    ordered = sorted(pairs)
    for (_, end), (start, next_end) in itertools.pairwise(ordered):
        if start < end:
            raise MaxpruneError(f"sequence ranges overlap: one ends at {end}, ({start}, {next_end}) "
                                f"starts before it; budgets must be disjoint")
    return pairs


def grain_seed(seed: int) -> int:
    """A well-mixed 32-bit seed for grain's shuffle.

    grain reshuffles epoch e with ``seed + e``; feeding it the user's seed directly
    would make seed 1's first epoch equal seed 0's second. Hashing the seed first
    keeps every (seed, epoch) pair's order independent.
    """
    return int(np.random.SeedSequence(int(seed)).generate_state(1, dtype=np.uint32)[0])


class ReadRows:
    """grain batch_fn: the positions of one global batch -> this process's rows, int32 [b, L].

    A class rather than a closure so grain worker processes can pickle it.
    """

    def __init__(self, dataset, positions: RangeUnion, row_start: int, row_end: int):
        self.dataset, self.positions = dataset, positions
        self.row_start, self.row_end = row_start, row_end

    def __call__(self, global_positions: Sequence[int]) -> np.ndarray:
        seq_ids = [self.positions[int(p)] for p in global_positions[self.row_start:self.row_end]]
        if hasattr(self.dataset, "__getitems__"):  # PreparedDataset: one batched ArrayRecord read
            rows = self.dataset.__getitems__(seq_ids)
        else:
            rows = [self.dataset[i] for i in seq_ids]
        return np.stack(rows).astype(np.int32, copy=False)


def _mark_absl_flags_parsed() -> None:
    """grain 0.2.18's worker processes read an absl flag and fail unless flags were parsed
    (google/grain#1355, fixed upstream after 0.2.18); outside `absl.app` nobody parses them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    """What fixes the stream of batches; stored in a loader's state to refuse a mismatched restore."""

    ranges: tuple[tuple[int, int], ...]
    seq_len: int
    global_batch: int
    seed: int
    shuffle: bool
    num_epochs: float | None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ranges": [list(r) for r in self.ranges]}


class Loader:
    """Iterates this process's local batches, int32 [global_batch // process_count, seq_len].

    `get_state()` / `set_state()` checkpoint the position in the stream (JSON-safe);
    `num_steps` is the number of global batches (None when repeating forever).
    """

    def __init__(self, dataset, spec: LoaderSpec, *, process_index: int, process_count: int,
                 num_threads: int, prefetch: int, workers: int):
        self.spec, self.dataset = spec, dataset
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = spec.global_batch // process_count
        self.positions = RangeUnion(spec.ranges)
        self._workers = workers
        self._iter_ds = self._build(num_threads, prefetch, workers)
        self._iterator = iter(self._iter_ds)

    def _build(self, num_threads: int, prefetch: int, workers: int) -> grain.IterDataset:
        spec = self.spec
        ds = grain.MapDataset.range(len(self.positions))
        if spec.shuffle:
            ds = ds.shuffle(seed=grain_seed(spec.seed))
        if spec.num_epochs is None:
            ds = ds.repeat(None)
        else:
            ds = ds.repeat(math.ceil(spec.num_epochs))[:self.num_sequences]
        row_start = self.process_index * self.local_batch
        read = ReadRows(self.dataset, self.positions, row_start, row_start + self.local_batch)
        ds = ds.batch(spec.global_batch, drop_remainder=True, batch_fn=read)
        iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                       prefetch_buffer_size=prefetch))
        if workers:
            _mark_absl_flags_parsed()
            iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        return iter_ds

    # --------------------------------------------------------------- sizes
    @property
    def seq_len(self) -> int:
        return self.spec.seq_len

    @property
    def sequences_per_epoch(self) -> int:
        return len(self.positions)

    @property
    def tokens_per_epoch(self) -> int:
        return self.sequences_per_epoch * self.seq_len

    @property
    def steps_per_epoch(self) -> float:
        """Global batches per epoch; fractional because batches run on across epoch boundaries."""
        return self.sequences_per_epoch / self.spec.global_batch

    @property
    def num_sequences(self) -> int | None:
        """Sequences in the whole stream before the last partial batch is dropped (None: forever)."""
        if self.spec.num_epochs is None:
            return None
        return round(self.spec.num_epochs * self.sequences_per_epoch)

    @property
    def num_steps(self) -> int | None:
        total = self.num_sequences
        return None if total is None else total // self.spec.global_batch

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("a loader that repeats forever (num_epochs=None) has no length")
        return self.num_steps

    # ----------------------------------------------------------- iteration
    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._iterator)

    def close(self) -> None:
        """Stop grain's prefetch threads and worker processes (also on `with` exit)."""
        self._iterator.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------- checkpoints
    def get_state(self) -> dict[str, Any]:
        """The stream position as JSON-safe data, plus the spec it belongs to."""
        return {"version": STATE_VERSION, "spec": self.spec.to_dict(), "workers": self._workers,
                "iterator": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from `get_state` of a loader with the same spec)."""
        if state.get("version") != STATE_VERSION:
            raise MaxpruneError(f"loader state version {state.get('version')!r} is not "
                                f"{STATE_VERSION}: it was written by another maxprune")
        mine = self.spec.to_dict()
        for key, value in state.get("spec", {}).items():
            if mine.get(key) != value:
                raise MaxpruneError(f"loader state is for {key}={value!r} but this loader has "
                                    f"{key}={mine.get(key)!r}; build the loader as it was saved")
        if state.get("workers") != self._workers:  # grain's worker states are per worker
            raise MaxpruneError(f"loader state was saved with workers={state.get('workers')} but "
                                f"this loader has workers={self._workers}")
        self._iterator.set_state(state["iterator"])


def make_loader(dataset, ranges: Sequence[tuple[int, int]], *, global_batch: int, seed: int,
                shuffle: bool = True, num_epochs: float | None = 1,
                process_index: int | None = None, process_count: int | None = None,
                num_threads: int = 4, prefetch: int = 64, workers: int = 0) -> Loader:
    """A `Loader` over the sequences of `dataset` (a PreparedDataset) inside `ranges`.

    Same seed -> same order; each epoch is reshuffled. `num_epochs` may be fractional
    (a budget that is not a whole number of epochs) or None (repeat forever). Process
    p of `process_count` (default: JAX's) gets rows [p*b, (p+1)*b) of each global batch.
    """
    import jax

    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = jax.process_count() if process_count is None else int(process_count)
    at_least("global_batch", global_batch, 1)
    if not 0 <= process_index < process_count:
        raise MaxpruneError(f"process_index={process_index} must be in [0, {process_count})")
    if global_batch % process_count:
        raise MaxpruneError(f"global_batch={global_batch} is not divisible by "
                            f"process_count={process_count}; use a multiple of {process_count}")
    if num_epochs is not None and not num_epochs > 0:
        raise MaxpruneError(f"num_epochs={num_epochs} must be > 0, or None to repeat forever")
    if workers < 0 or num_threads < 0 or prefetch < 0:
        raise MaxpruneError(f"workers={workers}, num_threads={num_threads} and "
                            f"prefetch={prefetch} must be >= 0")
    if not 0 <= seed < 2**63:
        raise MaxpruneError(f"seed={seed} must be in [0, 2**63)")
    pairs = check_ranges(ranges, len(dataset))
    seq_len = getattr(dataset, "seq_len", None) or int(np.asarray(dataset[pairs[0][0]]).shape[-1])
    spec = LoaderSpec(tuple(pairs), seq_len, int(global_batch), int(seed), bool(shuffle),
                      None if num_epochs is None else float(num_epochs))
    loader = Loader(dataset, spec, process_index=process_index, process_count=process_count,
                    num_threads=num_threads, prefetch=prefetch, workers=workers)
    if loader.num_steps == 0:
        raise MaxpruneError(f"{loader.num_sequences} sequences make no full global batch of "
                            f"{global_batch}: lower global_batch or give more data")
    return loader


@functools.lru_cache(maxsize=16)
def data_shard(mesh) -> tuple[int, int]:
    """(process_index, process_count) to give `make_loader` so its rows match `mesh`.

    The batch is split over the mesh's ('data', 'fsdp') axes. Usually each process
    holds one contiguous block of rows and this is just (process_index, process_count);
    processes that are replicas along 'tensor' share a block and so read the same rows.
    """
    import jax

    from maxprune.sharding import batch_sharding

    sharding = batch_sharding(mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]  # probe: one row per batch shard
    processes = sorted({device.process_index for device in mesh.devices.flat})
    blocks = sorted({_row_block(sharding, shards, pid) for pid in processes})
    size = blocks[0][1] - blocks[0][0]
    if blocks != [(i * size, (i + 1) * size) for i in range(len(blocks))]:
        raise MaxpruneError(f"the mesh {dict(mesh.shape)} gives processes uneven or overlapping "
                            f"blocks of batch shards {blocks}")
    return blocks.index(_row_block(sharding, shards, jax.process_index())), len(blocks)


def _row_block(sharding, num_rows: int, process_index: int) -> tuple[int, int]:
    """The [start, end) rows of a [num_rows, 1] array held by one process's devices."""
    rows = set()
    for device, index in sharding.devices_indices_map((num_rows, 1)).items():
        if device.process_index == process_index:
            rows.update(range(*index[0].indices(num_rows)))
    if not rows or len(rows) != max(rows) - min(rows) + 1:
        raise MaxpruneError(f"process {process_index} holds non-contiguous batch rows under this mesh")
    return min(rows), max(rows) + 1


def to_global_array(local_batch_BL: np.ndarray, mesh):
    """This process's local batch -> the global jax.Array, batch sharded over ('data', 'fsdp').

    The loader must have been built with `process_index, process_count = data_shard(mesh)`
    (which equal JAX's defaults on the usual process-major meshes).
    """
    import jax

    from maxprune.sharding import batch_sharding

    _, count = data_shard(mesh)
    global_shape = (local_batch_BL.shape[0] * count,) + tuple(local_batch_BL.shape[1:])
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh, local_batch_BL.ndim), local_batch_BL, global_shape)
