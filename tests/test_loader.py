"""The grain loader: determinism, per-process sharding, exact resume, range hygiene."""

import json

import numpy as np
import pytest

from maxprune.data.loader import make_loader, to_global_array
from maxprune.errors import MaxpruneError

SEQ_LEN = 4


class ArrayDataset:
    """Stands in for a PreparedDataset: row i is [i, i, ...], so a batch names its sequences."""

    def __init__(self, num_sequences: int):
        self.rows_NL = np.repeat(np.arange(num_sequences, dtype=np.int32)[:, None], SEQ_LEN, axis=1)

    def __len__(self):
        return len(self.rows_NL)

    def __getitem__(self, i):
        return self.rows_NL[i]


RANGES = [(0, 30), (50, 70)]  # 50 sequences in two disjoint pieces


def ids(batch_BL):
    return batch_BL[:, 0].tolist()


def stream(loader, steps=None):
    return [ids(batch_BL) for _, batch_BL in zip(range(steps or 10**9), loader)]


def loader(seed=0, **kwargs):
    kwargs = {"global_batch": 10, "num_epochs": 3, "num_threads": 0, **kwargs}
    return make_loader(ArrayDataset(100), RANGES, seed=seed, **kwargs)


def test_batches_are_int32_local_shape_and_sizes_are_reported():
    lo = loader(global_batch=10, process_index=1, process_count=2)
    batch_BL = next(lo)
    assert batch_BL.shape == (5, SEQ_LEN) and batch_BL.dtype == np.int32
    assert lo.tokens_per_epoch == 50 * SEQ_LEN and lo.steps_per_epoch == 5 and len(lo) == 15


def test_same_seed_same_order_other_seed_other_order_each_epoch_a_new_permutation():
    a, b, c = stream(loader(seed=7)), stream(loader(seed=7)), stream(loader(seed=8))
    assert a == b and a != c
    epochs = [sum(a[i:i + 5], []) for i in (0, 5, 10)]
    in_ranges = [i for start, end in RANGES for i in range(start, end)]
    assert all(sorted(epoch) == in_ranges for epoch in epochs)  # each epoch: every sequence once
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != in_ranges  # shuffled
    assert stream(loader(seed=1))[:5] != a[5:10]  # seed 1 is not seed 0's next epoch


def test_unshuffled_order_and_only_given_ranges():
    first = sum(stream(loader(shuffle=False, num_epochs=1)), [])
    assert first == list(range(0, 30)) + list(range(50, 70))
    seen = set(sum(stream(loader(num_epochs=2)), []))
    assert seen == set(range(0, 30)) | set(range(50, 70))


def test_fractional_epochs_and_last_partial_batch_dropped():
    lo = loader(global_batch=8, num_epochs=1.5)  # 75 sequences -> 9 full batches
    assert lo.num_sequences == 75 and len(lo) == 9 and len(stream(lo)) == 9


def test_two_processes_partition_every_global_batch():
    whole = stream(loader(global_batch=10))
    p0 = stream(loader(global_batch=10, process_index=0, process_count=2))
    p1 = stream(loader(global_batch=10, process_index=1, process_count=2))
    assert [a + b for a, b in zip(p0, p1, strict=True)] == whole
    assert all(not set(a) & set(b) for a, b in zip(p0, p1, strict=True))


@pytest.mark.parametrize("consumed", [2, 5, 7, 14])  # mid-epoch, at, and across epoch boundaries
def test_resumed_loader_continues_exactly(consumed):
    whole = stream(loader(seed=3))
    interrupted = loader(seed=3)
    stream(interrupted, consumed)
    state = json.loads(json.dumps(interrupted.get_state()))  # as a checkpoint would store it
    resumed = loader(seed=3)
    resumed.set_state(state)
    assert stream(resumed) == whole[consumed:]


def test_resume_on_another_process_count_keeps_the_global_stream():
    whole = stream(loader())
    one = loader()
    stream(one, 4)
    halves = [loader(process_index=p, process_count=2) for p in (0, 1)]
    for half in halves:
        half.set_state(one.get_state())
    assert [a + b for a, b in zip(stream(halves[0]), stream(halves[1]), strict=True)] == whole[4:]


def test_state_from_another_spec_is_refused():
    state = loader(seed=1).get_state()
    with pytest.raises(MaxpruneError, match="seed=1"):
        loader(seed=2).set_state(state)


@pytest.mark.parametrize("kwargs, match", [
    ({"global_batch": 10, "process_count": 3, "process_index": 0}, "not divisible by process_count=3"),
    ({"global_batch": 0}, "global_batch=0"),
    ({"num_epochs": 0}, "num_epochs=0"),
    ({"global_batch": 60, "num_epochs": 1}, "no full global batch"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(MaxpruneError, match=match):
        loader(**kwargs)


@pytest.mark.parametrize("ranges, match", [
    ([], "empty"),
    ([(0, 101)], r"\(0, 101\)"),
    ([(5, 5)], r"\(5, 5\)"),
    ([(0, 30), (20, 40)], "overlap"),
])
def test_bad_ranges(ranges, match):
    with pytest.raises(MaxpruneError, match=match):
        make_loader(ArrayDataset(100), ranges, global_batch=2, seed=0)


def test_forever_loader_keeps_going_and_has_no_length():
    lo = loader(num_epochs=None)
    assert len(stream(lo, 40)) == 40 and lo.num_steps is None
    with pytest.raises(TypeError):
        len(lo)


def test_to_global_array_shards_the_batch_over_data_and_fsdp(devices8):
    from maxprune.sharding import make_mesh

    class MeshCfg:
        data, fsdp, tensor = 2, 2, 2

    mesh = make_mesh(MeshCfg, devices8)
    batch_BL = next(loader(global_batch=8))
    global_BL = to_global_array(batch_BL, mesh)
    assert global_BL.shape == batch_BL.shape
    np.testing.assert_array_equal(np.asarray(global_BL), batch_BL)
    assert global_BL.sharding.spec[0] == ("data", "fsdp")
    assert {s.data.shape for s in global_BL.addressable_shards} == {(2, SEQ_LEN)}


def test_worker_processes_give_the_same_stream_and_resume():
    whole = stream(loader(num_epochs=1))
    with loader(num_epochs=1, workers=1) as first:
        head = stream(first, 2)
        state = json.loads(json.dumps(first.get_state()))
    with loader(num_epochs=1, workers=1) as resumed:
        resumed.set_state(state)
        assert head + stream(resumed) == whole
