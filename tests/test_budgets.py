import pytest

from maxprune.data.budgets import Plan, TokenRange, parse_budgets, parse_tokens
from maxprune.errors import MaxpruneError

L = 8  # seq_len
N = 1000 * L  # a dataset of 1000 sequences


def indices(budgets, name):
    return {i for start, end in budgets.sequences(name) for i in range(start, end)}


def test_parse_tokens_units():
    assert parse_tokens("200B") == 200 * 10**9
    assert parse_tokens("1.5K") == 1500 and parse_tokens("8_192") == 8192 and parse_tokens("2t") == 2 * 10**12
    for bad in ("1.0005K", "~5", "-5", "12X", ""):
        with pytest.raises(MaxpruneError):
            parse_tokens(bad)


def test_paper_layout_is_disjoint_and_union_is_exact():
    b = parse_budgets({"pretrain": "0:4K", "retrain": "4K:5.6K", "union": "pretrain+retrain",
                       "validation": "-80:", "rest": "5.6K:-80"}, N, L)
    assert b.sequences("pretrain") == [(0, 500)] and b.sequences("retrain") == [(500, 700)]
    assert b.sequences("union") == [(0, 700)]  # adjacent ranges merge
    assert indices(b, "union") == indices(b, "pretrain") | indices(b, "retrain")
    assert b.num_tokens("union") == b.num_tokens("pretrain") + b.num_tokens("retrain") == 5600
    assert b.sequences("validation") == [(990, 1000)]
    b.check_disjoint(["pretrain", "retrain", "validation", "rest"])
    assert b.to_dict()["union"] == [[0, 5600]]


def test_unions_of_explicit_ranges_merge_and_sort():
    b = parse_budgets({"odd": "800:1600 + 0:400 + 400:480", "all": ":"}, N, L)
    assert b.sequences("odd") == [(0, 60), (100, 200)]
    assert b.num_sequences("all") == 1000 and b.total_sequences == 1000


def test_overlap_names_the_pair_and_where():
    b = parse_budgets({"pretrain": "0:4K", "retrain": "3.2K:5.6K", "other": "6K:7K"}, N, L)
    with pytest.raises(MaxpruneError, match=r"budgets 'pretrain' and 'retrain' overlap in 800 tokens, "
                                            r"first at sequences \[400, 500\) = tokens 3200:4000"):
        b.check_disjoint(["other", "pretrain", "retrain"])
    b.check_disjoint(["pretrain", "other"])


@pytest.mark.parametrize("spec, message", [
    ({"a": "0:9K"}, r"range 0:9K = tokens 0:9,000 is empty or outside the dataset's 8,000 tokens "
                    r"\(1,000 sequences of 8\)"),
    ({"a": "-9K:"}, "outside the dataset"),
    ({"a": "80:80"}, "is empty"),
    ({"a": "0:1001"}, r"1001 = 1,001 tokens is not a multiple of seq_len 8; nearest valid: 1,000 or 1,008"),
    ({"a": "b+0:8"}, "refers to unknown budget 'b'; defined: a"),
    ({"a": "b", "b": "a"}, "refers to itself: a -> b -> a"),
    ({"a": "0-8"}, "neither START:END"),
    ({"a": "0:eight"}, "end 'eight' must be a token count"),
    ({"bad name": "0:8"}, "must be an identifier"),
])
def test_bad_budgets(spec, message):
    with pytest.raises(MaxpruneError, match=message):
        parse_budgets(spec, N, L)


def test_tilde_rounds_to_the_nearest_sequence_and_keeps_shared_bounds_adjacent():
    b = parse_budgets({"pretrain": "0:~1003", "retrain": "~1003:~2005", "union": "pretrain+retrain"}, N, L)
    assert b.sequences("pretrain") == [(0, 125)]  # 1003/8 = 125.4 -> 125
    assert b.sequences("retrain") == [(125, 251)]  # 2005/8 = 250.6 -> 251
    b.check_disjoint(["pretrain", "retrain"])
    assert b.sequences("union") == [(0, 251)]
    assert parse_budgets({"a": "~4:~12"}, N, L).sequences("a") == [(1, 2)]  # halves round up


def test_token_range():
    assert TokenRange(16, 40).sequences(8) == (2, 5) and TokenRange(16, 40).num_tokens == 24
    assert parse_budgets({"a": TokenRange(16, 40), "b": (40, 48)}, N, L).sequences("a") == [(2, 5)]
    with pytest.raises(MaxpruneError, match="not a multiple of seq_len 8"):
        TokenRange(16, 41).sequences(8)
    with pytest.raises(MaxpruneError, match="0 <= start < end"):
        TokenRange(5, 5)


def test_take_prefix_whole_repeat_and_exceed():
    b = parse_budgets({"retrain": "0:800 + 1600:2400"}, N, L)  # 200 sequences in two pieces
    small = b.take("retrain", 1000)
    assert small == Plan(((0, 100), (200, 225)), 125, 1.0, "retrain", L)  # 1000 tokens = 125 sequences
    assert b.take("retrain", 1001).num_sequences == 126  # rounds up to whole sequences
    assert b.take("retrain").ranges == ((0, 100), (200, 300)) and b.take("retrain").num_tokens == 1600
    with pytest.raises(MaxpruneError, match="'retrain' holds 1,600 tokens but 4,000 were asked for; "
                                            "allow repeating it \\(2.5 epochs\\)"):
        b.take("retrain", "4K")
    repeat = b.take("retrain", "4K", allow_repeat=True)
    assert (repeat.num_sequences, repeat.epochs, repeat.range_sequences) == (500, 2.5, 200)
    with pytest.raises(MaxpruneError, match="unknown budget 'pretrain'; defined: retrain"):
        b.take("pretrain", 8)
    with pytest.raises(MaxpruneError, match="must be > 0"):
        b.take("retrain", 0)
