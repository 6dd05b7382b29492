"""Ahead-of-time compilation of the train step for a TPU slice, on a machine without one.

`aot_compile(cfg, "v4-256")` builds the run's real train step
(`maxprune.train.step.make_train_step` with the config's Arch, model options,
recipe, microbatches, masks and teacher), lowers it against abstract inputs
(`jax.eval_shape`: nothing is allocated) sharded over a mesh of the topology's
devices, and compiles it with libtpu. The compiled program tells, per device,
how much HBM the step needs (arguments, outputs, temporaries, generated code)
and how many FLOPs it does, so a run that will not fit, or a batch that does
not divide, is found before a pod is booked.

Accelerator types are the Cloud TPU names: ``v4-N`` and ``v5p-N`` count
TensorCores (two per chip; one JAX device per chip in megacore mode), ``v5e-N``
(alias ``v5litepod-N``) and ``v6e-N`` count chips. Needs ``jax[tpu]`` (libtpu);
JAX itself keeps running on the CPU.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from maxprune import sharding
from maxprune.data.prepared import open_prepared
from maxprune.errors import MaxpruneError
from maxprune.model import llama
from maxprune.model import masks as masks_lib
from maxprune.model.layers import attention_impl
from maxprune.model.model_dir import read_arch
from maxprune.model.schema import arch_from_config
from maxprune.train import build
from maxprune.train.step import Teacher, init_state

GiB = 1024 ** 3
HBM_GIB = {"v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}  # per chip
# Chip grids of the slice shapes Cloud TPU offers, by chip count.
TORUS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
            192: (4, 4, 12), 256: (4, 8, 8), 512: (8, 8, 8), 768: (8, 8, 12), 1024: (8, 8, 16),
            2048: (8, 16, 16), 4096: (16, 16, 16)}
GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
# generation -> (prefix in TPU topology names, counts TensorCores?, chip grids)
GENERATIONS = {"v4": ("v4", True, {c: s for c, s in TORUS_3D.items() if c <= 2048}),
               "v5p": ("v5", True, TORUS_3D),
               "v5e": ("v5e", False, GRID_2D),
               "v6e": ("v6e", False, GRID_2D)}
ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A single TPU slice: its generation and chip grid."""

    generation: str  # v4, v5p, v5e, v6e
    chips: int
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        """The accelerator type, e.g. v4-256 (TensorCores for v4/v5p, chips otherwise)."""
        return f"{self.generation}-{self.chips * (2 if GENERATIONS[self.generation][1] else 1)}"

    @property
    def topology_name(self) -> str:
        return f"{GENERATIONS[self.generation][0]}:{'x'.join(map(str, self.shape))}"

    @property
    def megacore(self) -> bool:
        return GENERATIONS[self.generation][1]

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        if self.chips == 1:
            return (1, 1, 1)
        if not self.megacore and self.chips == 8:  # v5e-8 / v6e-8: one host with 8 chips
            return (2, 4, 1)
        return (2, 2, 1)

    @property
    def hosts(self) -> int:
        return max(1, self.chips // math.prod(self.chips_per_host_bounds))

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Torus wrap-around links: full 4x4x4 cubes (v4, v5p); 16-long rows/columns (v5e, v6e)."""
        if self.megacore:
            return (self.chips >= 64,) * 3
        return (self.shape[0] >= 16, self.shape[1] >= 16, False)

    @property
    def hbm_bytes(self) -> int:
        return HBM_GIB[self.generation] * GiB

    def describe(self) -> str:
        return (f"{self.name}: {self.chips} chips ({self.topology_name}{', megacore' if self.megacore else ''}), "
                f"{self.hosts} host{'s' if self.hosts > 1 else ''}, {HBM_GIB[self.generation]} GiB HBM per chip")


def valid_topologies() -> list[str]:
    return [Topology(g, chips, shape).name for g, (_, _, grids) in GENERATIONS.items()
            for chips, shape in grids.items()]


def parse_topology(name: str) -> Topology:
    """`v4-8`, `v5p-128`, `v5e-16` / `v5litepod-16`, `v6e-256` -> Topology; MaxpruneError if unknown."""
    generation, _, count = name.strip().lower().rpartition("-")
    generation = ALIASES.get(generation, generation)
    if generation in GENERATIONS and count.isdigit():
        _, cores, grids = GENERATIONS[generation]
        n = int(count)
        chips = n // 2 if cores and n % 2 == 0 else (None if cores else n)
        if chips in grids:
            return Topology(generation, chips, grids[chips])
    groups = {}
    for valid in valid_topologies():
        gen, _, n = valid.rpartition("-")
        groups.setdefault(gen, []).append(n)
    listing = "; ".join(f"{gen}-{{{','.join(ns)}}}" for gen, ns in groups.items())
    raise MaxpruneError(f"unknown TPU topology {name!r}; valid: {listing} (v5litepod-N = v5e-N)")


# ------------------------------------------------------------------ compile
@dataclasses.dataclass
class CompileReport:
    topology: str
    topology_detail: str
    mesh: dict[str, int]
    arch: dict[str, Any]
    num_params: int
    seq_len: int
    global_batch: int
    per_device_batch: int
    microbatches: int
    dtype: str
    remat: str
    masks: bool
    teacher: bool
    hbm_bytes: int
    fits: bool
    analytic_flops_per_device: float
    compile_s: float
    # From the compiled program; None when XLA refused it for lack of HBM (see `error`).
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    code_bytes: int | None = None
    total_bytes: int | None = None
    xla_flops_per_device: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        gib = _bytes
        mesh = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
        extras = ", ".join(x for x, on in (("masks", self.masks), ("teacher", self.teacher)) if on)
        xla = "n/a" if self.xla_flops_per_device is None else f"{self.xla_flops_per_device:.3e}"
        verdict = "fits" if self.fits else "does NOT fit"
        return "\n".join([
            f"topology  {self.topology_detail}",
            f"mesh      {mesh}",
            f"step      global batch {self.global_batch} ({self.per_device_batch} per device) x seq "
            f"{self.seq_len}, {self.microbatches} microbatch(es), {self.dtype}, remat {self.remat}"
            + (f", {extras}" if extras else ""),
            f"model     {self.num_params / 1e6:,.1f} M params: {self.arch['num_layers']} layers, hidden "
            f"{self.arch['hidden_size']}, ffn {self.arch['ffn_size']}, heads {self.arch['num_heads']}/"
            f"{self.arch['num_kv_heads']}, vocab {self.arch['vocab_size']}",
            *([f"memory    per device: arguments {gib(self.argument_bytes)}, outputs {gib(self.output_bytes)} "
               f"(aliased {gib(self.alias_bytes)}), temporaries {gib(self.temp_bytes)}, code {gib(self.code_bytes)}",
               f"          total {gib(self.total_bytes)} of {gib(self.hbm_bytes)} HBM: {verdict}"]
              if self.error is None else
              [f"memory    {verdict}: XLA refused the program: {self.error}"]),
            f"flops     per device per step: analytic {self.analytic_flops_per_device:.3e}; XLA's cost analysis "
            f"{xla} (it counts the scanned layer body once)",
            f"compile   {self.compile_s:.1f} s",
        ])


def _bytes(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def default_seq_len(cfg) -> int:
    """The prepared dataset's sequence length when `data.train` is readable, else 2048 (Table 9's)."""
    if cfg.data.train and (Path(cfg.data.train) / "manifest.json").is_file():
        return open_prepared(cfg.data.train).seq_len
    return 2048


def aot_compile(cfg, topology: str | Topology, *, seq_len: int | None = None,
                masks: bool | None = None) -> CompileReport:
    """Compile the config's train step for `topology`; see the module doc.

    `masks`: compile with the seven prunable kernels masked (default: when
    `train.init` / `train.masks_from` is a model dir with masks).
    """
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    seq_len = default_seq_len(cfg) if seq_len is None else seq_len
    arch, masks_dir = _arch_and_masks_dir(cfg)
    masks = masks_dir is not None if masks is None else masks
    if not 2 <= seq_len <= arch.max_position_embeddings:
        raise MaxpruneError(f"--seq-len={seq_len} must be in [2, {arch.max_position_embeddings}] "
                            f"(the model's max_position_embeddings)")

    data, fsdp, tensor = sharding.resolve_mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, topo.chips)
    per_device = build.check_batch(cfg.train.global_batch, cfg.train.microbatches, data * fsdp, topo.name)
    devices = tpu_devices(topo)



    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    options = llama.ModelOptions.from_config(cfg.model)
    # "auto" attention follows the target's platform, not this host's.
    platform = mesh.devices.flat[0].platform
    options = dataclasses.replace(options, attention=attention_impl(options.attention, options.compute_dtype,
                                                                     arch.head_dim, backend=platform))
    steps = 1000  # shapes do not depend on the schedule's length
    optimizer, schedule = build.optimizer_and_schedule(cfg.train, steps)
    params = llama.abstract_params(arch)
    state = jax.eval_shape(lambda p: init_state(p, optimizer), params)
    mask_tree = (masks_lib.from_kernels({k: jax.ShapeDtypeStruct(masks_lib.get_kernel(params, *k).shape, jnp.bool_)
                                         for k in masks_lib.PRUNABLE}) if masks else None)
    teacher, teacher_params = None, None
    if cfg.train.teacher:
        teacher = Teacher(read_arch(cfg.train.teacher), cfg.train.kd_weight, cfg.train.kd_temperature)
        teacher_params = llama.abstract_params(teacher.arch)
    step = build.build_step(cfg, arch, mesh, state, optimizer, schedule, options=options, masks=mask_tree,
                            teacher=teacher, teacher_params=teacher_params)

    def placed(tree, shardings):  # abstract inputs carrying the step's shardings
        if tree is None:
            return None
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    state = placed(state, step.state_sharding)
    mask_tree = placed(mask_tree, step.masks_sharding)
    teacher_params = placed(teacher_params, step.teacher_sharding)
    tokens = jax.ShapeDtypeStruct((cfg.train.global_batch, seq_len), jnp.int32, sharding=step.batch_sharding)
    tokens_per_step = cfg.train.global_batch * seq_len
    analytic = arch.train_flops_per_token(seq_len) * tokens_per_step / topo.chips
    if teacher is not None:
        analytic += teacher.arch.forward_flops(seq_len, causal=True) * cfg.train.global_batch / topo.chips
    report = CompileReport(
        topology=topo.name, topology_detail=topo.describe(), mesh={"data": data, "fsdp": fsdp, "tensor": tensor},
        arch=arch.to_dict(), num_params=arch.num_params(), seq_len=seq_len, global_batch=cfg.train.global_batch,
        per_device_batch=per_device, microbatches=cfg.train.microbatches, dtype=options.dtype,
        remat=options.remat, masks=bool(masks), teacher=teacher is not None, hbm_bytes=topo.hbm_bytes,
        fits=False, analytic_flops_per_device=analytic, compile_s=0.0)

    start = time.perf_counter()
    try:
        with sharding.use_mesh(mesh):
            compiled = step.fn.lower(state, tokens, mask_tree, teacher_params).compile()
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a program that needs more HBM than there is
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report.error = " ".join(str(e).split())
        report.compile_s = time.perf_counter() - start
        return report
    report.compile_s = time.perf_counter() - start

    mem = compiled.memory_analysis()
    for key, attr in (("argument_bytes", "argument_size_in_bytes"), ("output_bytes", "output_size_in_bytes"),
                      ("alias_bytes", "alias_size_in_bytes"), ("temp_bytes", "temp_size_in_bytes"),
                      ("code_bytes", "generated_code_size_in_bytes")):
        setattr(report, key, int(getattr(mem, attr, 0) or 0))
    report.total_bytes = (report.argument_bytes + report.output_bytes - report.alias_bytes
                          + report.temp_bytes + report.code_bytes)
    report.fits = report.total_bytes <= topo.hbm_bytes
    report.xla_flops_per_device = _flops(compiled)
    return report


def tpu_devices(topo: Topology) -> list:
    """The topology's (virtual) TPU devices from libtpu; MaxpruneError if libtpu is missing."""

    install = f"JAX TPU support not installed: pip install 'jax[tpu]=={jax.__version__}'"
    if not libtpu_available():
        raise MaxpruneError(install)
    from jax.experimental import topologies

    _compile_only_env(topo)
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topo.topology_name,
            chip_config_name="megacore" if topo.megacore else "default",
            chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=1, wrap=topo.wrap)
    except RuntimeError as e:  # libtpu missing although `libtpu` imports (e.g. a broken install)
        if "TPU support not installed" in str(e):
            raise MaxpruneError(install) from e
        raise
    if len(desc.devices) != topo.chips:
        raise MaxpruneError(f"libtpu made {len(desc.devices)} devices for {topo.name}, expected {topo.chips}")
    return list(desc.devices)


def _compile_only_env(topo: Topology) -> None:
    """Environment for libtpu as a compiler only, on a host without TPU chips.

    libtpu takes /tmp/libtpu_lockfile (one TPU user per host), which another JAX
    process that merely probed for a TPU may hold; and it looks for a TPU VM's
    metadata server and worker list, printing errors when there is none. Neither
    matters without chips, so allow several loads and name a one-host slice.
    On a TPU VM (chips present) nothing is changed.
    """
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                       ("TPU_ACCELERATOR_TYPE", topo.name), ("TPU_WORKER_HOSTNAMES", "localhost")):
        os.environ.setdefault(key, value)


def libtpu_available() -> bool:
    """Whether JAX can find libtpu (as `jax._src.xla_bridge.get_tpu_library_path` looks for it)."""
    if os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", "")):
        return True
    try:
        return importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["libtpu"] is None
        return False


def _arch_and_masks_dir(cfg):
    """The Arch the run trains (the init model dir's, else the config's) and a dir holding masks, if any."""

    source = cfg.train.init or cfg.train.masks_from
    if cfg.train.init:
        arch = read_arch(cfg.train.init)
    else:
        arch = arch_from_config(cfg)
    return arch, (source if source and (Path(source) / "masks").is_dir() else None)


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None
