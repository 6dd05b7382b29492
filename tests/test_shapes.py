"""Ratio → candidate shapes against the paper's Tables 1 and 5–7 (Llama-3.1-8B dims)."""

import csv
from importlib import resources

import pytest

from maxprune.errors import MaxpruneError
from maxprune.model.arch import preset
from maxprune.prune.structured import shapes

BASE = preset("llama3.1-8b")
# The paper's ratio labels: 81.3 % is 1 − 1.5/8 = 13/16, printed rounded. Its 50 % rows hold half the
# prunable weights (as 50 % sparsity does); the 62.5–81.3 % rows are fractions of the whole count.
PAPER_RATIO = {"0.5": (0.5, "prunable"), "0.625": (0.625, "params"), "0.75": (0.75, "params"),
               "0.813": (13 / 16, "params")}


def _table(name):
    text = resources.files("maxprune.study").joinpath("paper_tables", name).read_text()
    return list(csv.DictReader(text.splitlines()))


def _candidates_csv(method):
    rows = [r for r in _table("table05_07_arch_search_candidates.csv") if r["method"] == method]
    return {ratio: [r for r in rows if r["ratio"] == ratio] for ratio in dict.fromkeys(r["ratio"] for r in rows)}


def _row(arch):
    return (arch.hidden_size, arch.num_heads, arch.ffn_size)


def _csv_row(r):
    return (int(r["hidden_size"]), int(r["heads"]), int(r["ffn_size"]))


def _table1(method, ratio):
    r = next(r for r in _table("table01_architectures.csv")
             if r["method"] == method and r["pruning_ratio"] == ratio)
    return int(r["num_layers"]), int(r["hidden_size"]), int(r["num_attention_heads"]), int(r["ffn_size"])


# ------------------------------------------------------------- Tables 6, 7
def test_table6_flap_candidates_exactly():
    (rows,) = _candidates_csv("flap").values()
    ours = shapes.kv_group_candidates(BASE, 0.5)
    assert [_row(a) for a in ours] == [_csv_row(r) for r in rows]
    assert [round(shapes.describe(a)["params"] / 1e9, 1) for a in ours] == [float(r["params_billion"]) for r in rows]
    assert all(a.num_kv_heads * 4 == a.num_heads for a in ours)  # whole GQA groups: 20 heads = 5 groups
    _, hidden, heads, ffn = _table1("flap", "0.5")
    selected = next(r for r in rows if r["selected"] == "yes")
    assert _csv_row(selected) == (hidden, heads, ffn) == (4096, 20, 6656)


def test_table7_sheared_candidates_exactly():
    (rows,) = _candidates_csv("sheared_llama").values()
    ours = shapes.kv_group_candidates(BASE, 0.5, hidden_sizes=(3072, 3456), method="sheared_llama")
    assert [_row(a) for a in ours] == [_csv_row(r) for r in rows]
    assert {round(a.num_params() / 1e9, 1) for a in ours} == {4.5}
    _, hidden, heads, ffn = _table1("sheared_llama", "0.5")
    assert (hidden, heads, ffn) in [_row(a) for a in ours]


def test_half_ratio_is_the_sparse_methods_count():
    """At 50 % every method holds what Wanda / SparseGPT at 50 % hold (non-zeros)."""
    assert shapes.target_params(BASE, 0.5) == BASE.num_params(sparsity=0.5) == 4_540_600_320


# ------------------------------------------------------------------ Table 1
@pytest.mark.parametrize("ratio", ["0.5", "0.625", "0.75", "0.813"])
def test_table1_minitron_depth_layers(ratio):
    layers, *_ = _table1("minitron_depth", ratio)
    assert shapes.depth_layers_kept(BASE, *PAPER_RATIO[ratio]) == layers


def test_table1_minitron_width_half():
    _, hidden, heads, ffn = _table1("minitron_width", "0.5")
    ours = shapes.minitron_width_candidates(BASE, 0.5)
    assert (hidden, heads, ffn) == (3072, 32, 9216) and (hidden, heads, ffn) in [_row(a) for a in ours]


# ------------------------------------------------------------------ Table 5
# Our FFN sizes for Table 5's hidden sizes (largest multiple of 128 under each ratio's target).
OURS_TABLE5 = {"0.625": [8320, 7424, 6784, 6144, 5504], "0.75": [6400, 5504, 4736, 4096], "0.813": [4992, 4096, 3328]}


@pytest.mark.parametrize("ratio", ["0.625", "0.75", "0.813"])
def test_table5_minitron_width_hidden_sizes_exactly(ratio):
    rows = _candidates_csv("minitron_width")[ratio]
    value, ratio_of = PAPER_RATIO[ratio]
    ours = shapes.minitron_width_candidates(BASE, value, ratio_of)
    assert [a.hidden_size for a in ours] == [int(r["hidden_size"]) for r in rows]
    assert [a.ffn_size for a in ours] == OURS_TABLE5[ratio]
    target = shapes.target_params(BASE, value, ratio_of)
    for a in ours:  # each fills the target to within one FFN rounding step, under it
        assert 0 <= target - a.num_params() < 3 * a.num_layers * a.hidden_size * 128
    # The paper's shapes are admissible (2h <= FFN <= 4h, multiples of 128) but hold more than the target.
    for r in rows:
        h, heads, f = _csv_row(r)
        assert heads == 32 and h % 128 == 0 and f % 128 == 0 and 2 * h <= f <= 4 * h
    assert shapes.minitron_width_candidates(BASE, 0.813, "params")[-1].hidden_size == 1536  # label ≠ 13/16


@pytest.mark.parametrize("ratio, nominal", [("0.75", 2.1e9), ("0.813", 1.6e9)])
def test_table5_ffn_sizes_follow_round_targets(ratio, nominal):
    """How the paper's 75 / 81.3 % FFN sizes arise: the same floor-to-128 rule at 2.1 B / 1.6 B, capped at 4h."""
    for r in _candidates_csv("minitron_width")[ratio]:
        h, heads, f = _csv_row(r)
        assert min(shapes.ffn_for(BASE.replace(hidden_size=h), int(nominal), 128), 4 * h) == f


def test_table1_minitron_width_selected_shapes_are_table5_candidates():
    for ratio in ("0.625", "0.75", "0.813"):
        _, hidden, heads, ffn = _table1("minitron_width", ratio)
        selected = next(r for r in _candidates_csv("minitron_width")[ratio] if r["selected"] == "yes")
        assert _csv_row(selected) == (hidden, heads, ffn)


@pytest.mark.parametrize("method, ratio", [("minitron_depth", "0.5"), ("minitron_width", "0.5"),
                                           ("sheared_llama", "0.5"), ("minitron_depth", "0.625"),
                                           ("minitron_depth", "0.75"), ("minitron_depth", "0.813")])
def test_target_arch_is_table1(method, ratio):
    layers, hidden, heads, ffn = _table1(method, ratio)
    a = shapes.target_arch(method, BASE, *PAPER_RATIO[ratio])
    assert (a.num_layers, a.hidden_size, a.num_heads, a.ffn_size) == (layers, hidden, heads, ffn)


@pytest.mark.parametrize("ratio", ["0.625", "0.75", "0.813"])
def test_target_arch_minitron_width_hidden_is_table1(ratio):
    """Without a search the median candidate is taken: the paper's selected hidden size (its FFN: see Table 5)."""
    hidden = shapes.target_arch("minitron_width", BASE, *PAPER_RATIO[ratio]).hidden_size
    assert hidden == _table1("minitron_width", ratio)[1]


def test_target_arch_flap_default_is_the_median_not_the_papers_search_result():
    a = shapes.target_arch("flap", BASE, 0.5)
    assert (a.num_heads, a.num_kv_heads, a.ffn_size, a.out_bias) == (24, 6, 6272, True)  # paper's search: 20 heads


# ------------------------------------------------------------------- others
def test_uniform_flap_shape_halves_both_modules():
    arch = shapes.flap_uniform_shape(BASE, 0.5)
    assert (arch.num_kv_heads, arch.num_heads, arch.ffn_size) == (4, 16, 7168)


def test_auto_multiple():
    assert shapes.auto_multiple(BASE) == 128
    assert shapes.auto_multiple(preset("tiny")) == 4


def test_minitron_width_with_fewer_heads_counts_them():
    ours = shapes.minitron_width_candidates(BASE, 0.5, num_heads=16)
    assert {a.num_heads for a in ours} == {16} and all(a.num_params() <= shapes.target_params(BASE, 0.5) for a in ours)


def test_any_ratio_removes_a_layer():
    assert shapes.depth_layers_kept(BASE, 0.01) == 31


@pytest.mark.parametrize("call, fragment", [
    (lambda: shapes.minitron_width_candidates(BASE, 0.9999, "params"), "no admissible minitron_width shape"),
    (lambda: shapes.kv_group_candidates(BASE, 0.95, min_kv_groups=8), "no admissible flap shape"),
    (lambda: shapes.depth_layers_kept(BASE, 0.99, "params"), "not even one"),
    (lambda: shapes.kv_groups_for(BASE, 18), "whole KV groups"),
    (lambda: shapes.minitron_width_candidates(BASE, 0.5, num_heads=12), "same number of query heads"),
    (lambda: shapes.target_params(BASE, 0.5, "weights"), "ratio_of"),
    (lambda: shapes.target_params(BASE, 1.0), "must be in"),
])
def test_bad_input_is_a_clear_error(call, fragment):
    with pytest.raises(MaxpruneError, match=fragment):
        call()
