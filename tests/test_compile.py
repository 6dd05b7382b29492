"""AOT compile for TPU topologies: names -> slice shapes, bad input, and (with libtpu) a real compile."""

import json
import sys

import pytest

from maxprune.cli import main
from maxprune.errors import MaxpruneError
from maxprune.schema import load_config
from maxprune.train import aot

GiB = 1024 ** 3
TINY = ["--config.model.preset=tiny", "--config.train.global_batch=8"]
needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(),
                                  reason="libtpu not installed: pip install 'jax[tpu]==<jax version>' to run AOT")


def test_accelerator_types_map_to_slice_shapes():
    t = aot.parse_topology("v4-8")
    assert (t.chips, t.shape, t.topology_name, t.hosts, t.megacore, t.wrap, t.hbm_bytes) == (
        4, (2, 2, 1), "v4:2x2x1", 1, True, (False, False, False), 32 * GiB)
    t = aot.parse_topology("v4-256")  # 256 TensorCores = 128 chips, 32 hosts of 4
    assert (t.chips, t.shape, t.hosts, t.wrap) == (128, (4, 4, 8), 32, (True, True, True))
    assert aot.parse_topology("v5litepod-16") == aot.parse_topology("v5e-16")
    t = aot.parse_topology("v5e-16")  # v5e counts chips
    assert (t.name, t.chips, t.shape, t.topology_name, t.hosts, t.hbm_bytes) == (
        "v5e-16", 16, (4, 4), "v5e:4x4", 4, 16 * GiB)
    t = aot.parse_topology("v6e-8")  # one host with 8 chips
    assert (t.chips, t.chips_per_host_bounds, t.hosts) == (8, (2, 4, 1), 1)
    assert aot.parse_topology("v5p-8").topology_name == "v5:2x2x1"
    assert aot.parse_topology("v5p-8").hbm_bytes == 95 * GiB
    for name in aot.valid_topologies():
        assert aot.parse_topology(name).name == name


@pytest.mark.parametrize("name", ["v4-7", "v4-6", "v3-8", "v5e-2", "tpu", "v4-8192"])
def test_unknown_topology_lists_the_valid_ones(name, capsys):
    assert main(["compile", "--topology", name, *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"maxprune: error: unknown TPU topology '{name}'; valid: v4-{{8,16,32,")
    assert "v5e-{1,4,8,16" in err and "v6e-" in err and err.count("\n") == 1


def test_batch_that_does_not_divide_the_devices(capsys):
    assert main(["compile", "--topology", "v4-8", *TINY, "--config.train.global_batch=6"]) == 2
    assert capsys.readouterr().err == (
        "maxprune: error: train.global_batch=6 does not divide over the 4 data-parallel devices "
        "(mesh data x fsdp) of v4-8: the per-device batch would be 1.5; use a multiple of 4\n")
    # tensor parallelism leaves fewer data-parallel devices: 16 chips / tensor 4 = 4
    cfg = load_config(None, TINY + ["--config.train.global_batch=6", "--config.mesh.tensor=4"])
    with pytest.raises(MaxpruneError, match="over the 4 data-parallel devices .* of v4-32"):
        aot.aot_compile(cfg, "v4-32")


def test_missing_libtpu_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` fails, as without jax[tpu]
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    assert not aot.libtpu_available()
    assert main(["compile", "--topology", "v4-8", *TINY]) == 2
    import jax
    assert capsys.readouterr().err == (
        f"maxprune: error: JAX TPU support not installed: pip install 'jax[tpu]=={jax.__version__}'\n")


@pytest.fixture
def quiet_libtpu(monkeypatch):
    """The compile-only environment compile.py would set, restored after the test."""
    for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                       ("TPU_ACCELERATOR_TYPE", "v4-8"), ("TPU_WORKER_HOSTNAMES", "localhost")):
        monkeypatch.setenv(key, value)


@needs_libtpu
def test_aot_compile_for_v4_8(quiet_libtpu, tmp_path, capsys):
    cfg = load_config(None, TINY)
    dense = aot.aot_compile(cfg, "v4-8", seq_len=64)
    assert dense.mesh == {"data": 1, "fsdp": 4, "tensor": 1} and dense.per_device_batch == 2
    assert dense.error is None and dense.fits and dense.hbm_bytes == 32 * GiB
    assert dense.argument_bytes > 0 and dense.code_bytes > 0 and dense.temp_bytes >= 0
    # The donated state aliases the new one: arguments + outputs - aliased + temporaries + code.
    assert dense.alias_bytes > 0
    assert dense.total_bytes == (dense.argument_bytes + dense.output_bytes - dense.alias_bytes
                                 + dense.temp_bytes + dense.code_bytes)
    assert dense.xla_flops_per_device > 0 and dense.analytic_flops_per_device > 0
    # Masks are bool inputs of the kernels' shapes: more argument bytes, same outputs.
    masked = aot.aot_compile(cfg, "v4-8", seq_len=64, masks=True)
    assert masked.masks and masked.argument_bytes > dense.argument_bytes
    assert masked.output_bytes == dense.output_bytes

    out = tmp_path / "report.json"
    assert main(["compile", "--topology", "v4-8", *TINY, "--seq-len=64", f"--json={out}"]) == 0
    printed = capsys.readouterr().out
    assert "v4-8: 4 chips (v4:2x2x1, megacore), 1 host, 32 GiB HBM per chip" in printed and ": fits" in printed
    assert json.loads(out.read_text())["total_bytes"] == dense.total_bytes


@needs_libtpu
def test_step_that_needs_more_hbm_than_the_chip_does_not_fit(quiet_libtpu, capsys):
    """llama-1b, 4 x 2048 tokens per chip, no remat: XLA:TPU refuses it (exit 1, not an error)."""
    argv = ["compile", "--topology", "v4-8", "--config.model.preset=llama-1b", "--config.train.global_batch=16",
            "--seq-len=2048"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "does NOT fit: XLA refused the program: RESOURCE_EXHAUSTED" in out
