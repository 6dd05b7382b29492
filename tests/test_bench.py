"""`maxprune bench step`: Table 1's pruned shapes from any base, width scaling, and a real timed run."""

import json

import pytest

from maxprune.cli import main
from maxprune.errors import MaxpruneError
from maxprune.model.arch import preset
from maxprune.train import bench

LLAMA8B = preset("llama3.1-8b")


def test_variants_of_llama_8b_are_table_1_and_table_9():
    table1 = {(r["method"], float(r["pruning_ratio"])): r for r in bench._read_csv("table01_architectures.csv")}
    paper9 = bench.paper_table9()
    variants = bench.variants(LLAMA8B)
    assert [v.name for v in variants] == [
        "base", "minitron_depth-0.5", "minitron_depth-0.625", "minitron_depth-0.75", "minitron_depth-0.813",
        "minitron_width-0.5", "minitron_width-0.625", "minitron_width-0.75", "minitron_width-0.813",
        "flap-0.5", "sheared_llama-0.5", "sparse-0.5"]
    for v in variants:
        row = table1[("wanda" if v.method == "sparse" else v.method, v.ratio)]
        a = v.arch
        assert (a.num_layers, a.num_heads, a.hidden_size, a.ffn_size) == (
            int(row["num_layers"]), int(row["num_attention_heads"]), int(row["hidden_size"]), int(row["ffn_size"]))
        assert a.head_dim == 128 and a.num_heads // a.num_kv_heads == 4  # FLAP: 20 heads = 5 of 8 groups
        if v.method != "sparse":  # Table 9's forward TFLOPs at seq 2048
            assert v.forward_flops(2048) / 1e12 == pytest.approx(paper9[v.name]["forward_tflops_seq2048"], rel=0.02)
    sparse = variants[-1]
    assert sparse.arch == LLAMA8B and sparse.sparsity == 0.5
    # Table 9 halves everything for 50 % sparsity (16.5 = 32.9 / 2); we count non-zero kernel weights
    # only (attention scores and lm_head stay dense), which is more.
    assert 16.5e12 < sparse.forward_flops(2048) < LLAMA8B.forward_flops(2048)


def test_ratios_apply_to_any_base():
    one_b = {v.name: v.arch for v in bench.variants(preset("llama-1b"))}
    assert one_b["minitron_depth-0.813"].num_layers == 1  # 16 layers x 2/32
    assert (one_b["flap-0.5"].num_heads, one_b["flap-0.5"].num_kv_heads) == (20, 5)
    assert one_b["minitron_width-0.5"].hidden_size == 1536  # 2048 x 3072/4096
    assert one_b["sheared_llama-0.5"].tie_embeddings  # everything else is the base's


def test_scale_shrinks_widths_and_keeps_counts():
    small = bench.scale_arch(LLAMA8B, 1 / 32)
    assert (small.hidden_size, small.ffn_size, small.head_dim, small.vocab_size) == (128, 448, 4, 4008)
    assert (small.num_layers, small.num_heads, small.num_kv_heads) == (32, 32, 8)
    depth = {v.name: v.arch.num_layers for v in bench.variants(small)}
    assert [depth[f"minitron_depth-{r}"] for r in ("0.5", "0.625", "0.75", "0.813")] == [16, 8, 4, 2]
    with pytest.raises(MaxpruneError, match="--scale=2"):
        bench.scale_arch(LLAMA8B, 2)


def test_unknown_variant_names_the_valid_ones():
    with pytest.raises(MaxpruneError, match="unknown variant.*'flap-0.9'.*valid: base, minitron_depth-0.5"):
        bench.select(bench.variants(LLAMA8B), "flap-0.9")
    assert [v.name for v in bench.select(bench.variants(LLAMA8B), "flap-0.5")] == ["base", "flap-0.5"]


def test_bench_step_writes_a_table_9_report(tmp_path, capsys, devices8):
    out = tmp_path / "report"
    argv = ["bench", "step", "--config.model.preset=tiny", "--config.model.dtype=float32", "--seq-len=16",
            "--steps=2", "--warmup=0", "--variants=minitron_depth-0.5", f"--out={out}", f"--trace={tmp_path / 'trace'}"]
    assert main(argv) == 0
    report = json.loads((out / "bench_step.json").read_text())
    base, depth = report["rows"]
    assert (base["variant"], depth["variant"]) == ("base", "minitron_depth-0.5")
    assert depth["arch"]["num_layers"] == 1 and base["arch"]["num_layers"] == 2
    assert base["speedup"] == 1.0 and depth["speedup"] == pytest.approx(base["step_s"] / depth["step_s"])
    assert len(depth["step_times_s"]) == 2 and all(t > 0 for t in depth["step_times_s"])
    assert depth["flops_ratio"] > 1 and depth["paper_speedup_tpu_v4"] == 1.9
    assert base["tokens_per_s"] == pytest.approx(8 * 16 / base["step_s"]) and 0 < base["mfu"] < 1
    assert report["device"]["count"] == 8 and report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    md = (out / "bench_step.md").read_text()
    assert "| minitron_depth-0.5 | 1 | 64 | 192 | 4 (2) |" in md and "| 1.9x |" in md
    assert md in capsys.readouterr().out
    assert any((tmp_path / "trace" / "base").rglob("*.xplane.pb"))  # jax.profiler trace
