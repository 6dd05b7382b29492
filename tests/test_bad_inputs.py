"""Wrong input to every command: exit 2, one `maxprune: error:` line naming the problem, no traceback,
and nothing written or changed on disk.

Each row of `CASES` is (id, argv builder, expected substring). The builder gets `Env`: module-scoped
inputs (a tiny model dir, prepared datasets, broken dirs, config files) and, per case, a fresh cwd
holding an existing output dir (`existing/keep.txt`) and a plain file (`afile`). Every file under the
inputs and the cwd is hashed before and after the call; they must be identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple

import numpy as np
import pytest

from maxprune.cli import main

REPO = Path(__file__).resolve().parents[1]
PRUNE = REPO / "configs" / "prune"


# ------------------------------------------------------------------ inputs
def _random_params(arch):
    import jax

    from maxprune.model import llama
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda leaf: (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32),
                        llama.abstract_params(arch))


def _write_configs(root: Path) -> dict[str, Path]:
    files = {
        "syntax": "def get_config(arg=None:\n    return {}\n",
        "unknown": "def get_config(arg=None):\n    return {'model': {'presett': 'tiny'}}\n",
        "wrongtype": "def get_config(arg=None):\n    return {'train': {'global_batch': 'eight'}}\n",
        "noarg": "def get_config():\n    return {}\n",
    }
    for name, text in files.items():
        (root / f"{name}.py").write_text(text)
    return {name: root / f"{name}.py" for name in files}


def _hf_dir(path: Path, files: dict[str, bytes], **config) -> Path:
    """An HF checkpoint dir: a tiny Llama config.json (with `config` changes) and `files`."""
    path.mkdir()
    base = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4}
    (path / "config.json").write_text(json.dumps({**base, **config}))
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


@pytest.fixture(scope="module")
def inputs(tiny_corpus, tmp_path_factory):
    """Everything the cases read; nothing here may change."""
    from maxprune.data import tokenizer as tokenizer_lib
    from maxprune.model.arch import preset
    from maxprune.model.model_dir import save_model_dir

    root = tmp_path_factory.mktemp("bad_inputs")
    tok = tiny_corpus["tokenizer"]
    other = tokenizer_lib.train_bpe(iter(["a b c d e f", "g h i j"] * 20), 280, root / "other_tok")
    arch = preset("tiny").replace(vocab_size=300)
    params = _random_params(arch)
    model = save_model_dir(root / "model", arch, params, provenance={"method": "test", "tokenizer_hash": tok.hash},
                           tokenizer_dir=tiny_corpus["root"] / "tokenizer")
    model_other = save_model_dir(root / "model_other", arch, params, tokenizer_dir=root / "other_tok",
                                 provenance={"method": "test", "tokenizer_hash": other.hash})
    for name, arch_text in (("no_arch", None), ("bad_arch", '{"vocab_size": 3')):
        (root / name / "params").mkdir(parents=True)
        if arch_text is not None:
            (root / name / "arch.json").write_text(arch_text)
    hf = {"hf_bin": _hf_dir(root / "hf_bin", {"pytorch_model.bin": b"PK\x03\x04 never unpickled"}),
          "hf_heads": _hf_dir(root / "hf_heads", {}, num_attention_heads=5, num_key_value_heads=5),
          "hf_kv": _hf_dir(root / "hf_kv", {}, num_key_value_heads=3),
          "hf_corrupt": _hf_dir(root / "hf_corrupt", {"model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{"}),
          "hf_list": _hf_dir(root / "hf_list", {})}
    (root / "hf_list" / "config.json").write_text("[1, 2]")
    bad_manifest = root / "bad_manifest"
    bad_manifest.mkdir()
    text = (tiny_corpus["validation"] / "manifest.json").read_text()
    (bad_manifest / "manifest.json").write_text(text[:len(text) // 2])
    return SimpleNamespace(root=root, corpus=tiny_corpus["root"], model=model, model_other=model_other,
                           no_arch=root / "no_arch", bad_arch=root / "bad_arch", **hf,
                           bad_manifest=bad_manifest, train=tiny_corpus["train"], val=tiny_corpus["validation"],
                           tok=tiny_corpus["root"] / "tokenizer", other_tok=root / "other_tok",
                           txt=f"txt:{tiny_corpus['root'] / 'train'}/*.txt", cfg=_write_configs(root))


class Env(SimpleNamespace):
    """`inputs` plus the case's cwd: `existing` (a non-empty dir) and `afile`."""

    @classmethod
    def make(cls, inputs, cwd: Path) -> "Env":
        (cwd / "existing").mkdir()
        (cwd / "existing" / "keep.txt").write_text("keep me\n")
        (cwd / "afile").write_text("not a dir\n")
        return cls(**vars(inputs), cwd=cwd, existing=cwd / "existing", afile=cwd / "afile",
                   new=cwd / "new")


def snapshot(*roots: Path) -> dict[str, object]:
    """Every dir and file under `roots`: relative path -> "dir" or (size, sha256)."""
    tree = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            key = f"{root.name}/{path.relative_to(root)}"
            tree[key] = "dir" if path.is_dir() else (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return tree


# ------------------------------------------------------------------ cases
class Case(NamedTuple):
    id: str
    argv: Callable[[Env], list]
    expected: str


def prune(e: Env, *extra, config: str | None = None, model=None) -> list:
    """A prune call of `e.model` into `e.new` with `extra` overrides."""
    return ["prune", *([f"--config={config}"] if config else []), f"--config.prune.input={model or e.model}",
            f"--config.prune.output={e.new}", f"--config.prune.calibration={e.train}", "--quiet", *extra]


def pmethod(e: Env, method: str, *extra) -> list:
    """`prune` with the method's config file (configs/prune/METHOD.py)."""
    return prune(e, *extra, config=f"{PRUNE}/{method}.py")


def train(e: Env, *extra) -> list:
    return ["train", str(e.new), "--quiet", f"--config.data.train={e.train}", "--config.model.arch.vocab_size=300",
            "--config.train.tokens=2K", "--config.train.global_batch=8", *extra]


def study(e: Env, action: str, *extra) -> list:
    return ["study", action, "--root", str(e.new), f"--config.data.train={e.train}",
            "--config.study.pretrain_tokens=8K", "--config.study.retrain_tokens=('4K',)",
            "--config.study.variants=('wanda/2:4@0.5',)", *extra]


CASES = [
    # --- configs: unknown, mistyped, wrong type, out of range, missing file, syntax error, :ARG
    Case("forward-unknown-key", lambda e: ["forward", "--config.model.bogus=1"], "unknown config key 'model.bogus'"),
    Case("init-mistyped-key", lambda e: ["init", str(e.new), "--config.model.arch.num_layer=1"],
         "did you mean 'model.arch.num_layers'"),
    Case("init-wrong-type", lambda e: ["init", str(e.new), "--config.model.arch.num_layers=two"],
         "'model.arch.num_layers' in override '--config.model.arch.num_layers=two' expects int"),
    Case("forward-negative-seed", lambda e: ["forward", "--config.seed=-1"], "seed=-1 must be >= 0"),
    Case("forward-override-no-value", lambda e: ["forward", "--config.seed"], "has no value"),
    Case("forward-section-value", lambda e: ["forward", "--config.model=3"],
         "'model' in override '--config.model=3' is a section"),
    Case("init-config-file-unknown-key", lambda e: ["init", str(e.new), f"--config={e.cfg['unknown']}"],
         "did you mean 'model.preset'"),
    Case("compile-config-file-wrong-type",
         lambda e: ["compile", "--topology", "v4-8", f"--config={e.cfg['wrongtype']}"],
         "'train.global_batch'"),
    Case("train-missing-config-file", lambda e: ["train", str(e.new), "--config=nope/missing.py"],
         "config file nope/missing.py does not exist"),
    Case("prune-config-syntax-error", lambda e: ["prune", f"--config={e.cfg['syntax']}"], "SyntaxError"),
    Case("prune-config-bad-arg", lambda e: prune(e, config=f"{PRUNE}/minitron_depth.py:0.3"),
         "ARG '0.3' is not valid; choose one of 0.5, 0.625, 0.75, 0.813"),
    Case("prune-config-arg-typo", lambda e: prune(e, config=f"{PRUNE}/flap.py:serch"), "ARG 'serch' is not valid"),
    Case("study-config-arg-typo", lambda e: ["study", "plan", f"--config={REPO}/configs/study/mini.py:al"],
         "ARG 'al' is not valid; choose one of all"),
    Case("prune-config-arg-not-accepted", lambda e: ["prune", f"--config={e.cfg['noarg']}:x"], "takes no :ARG"),
    Case("prune-config-arg-bad-pattern", lambda e: prune(e, config=f"{PRUNE}/wanda.py:3:2"),
         "prune.pattern='3:2' needs 0 < N < M"),
    Case("eval-wrong-type", lambda e: ["eval", str(e.model), "--config.eval.limit=abc"], "expects int or None"),
    Case("eval-out-of-range", lambda e: ["eval", str(e.model), "--config.eval.batch_size=0"], "eval.batch_size=0"),
    Case("eval-pack-length", lambda e: ["eval", str(e.model), "--config.eval.pack_length=0"], "eval.pack_length=0"),
    Case("study-mistyped-key", lambda e: ["study", "plan", "--config.study.variant=('wanda@0.5',)"],
         "did you mean 'study.variants'"),
    Case("demo-unknown-key", lambda e: ["demo", "--root", str(e.new), "--config.study.bogus=1"],
         "unknown config key 'study.bogus'"),
    Case("demo-negative-seed", lambda e: ["demo", "--root", str(e.new), "--config.study.seeds=(-1,)"],
         "study.seeds=(-1,)"),
    Case("bench-out-of-range", lambda e: ["bench", "step", "--out", str(e.new), "--config.train.microbatches=0"],
         "train.microbatches=0"),
    Case("train-tokens-malformed", lambda e: train(e, "--config.train.tokens=lots"), "lots"),
    # --- paths
    Case("inspect-missing-dir", lambda e: ["inspect", str(e.cwd / "nope")], "does not exist"),
    Case("inspect-file-not-dir", lambda e: ["inspect", str(e.afile)], "afile"),
    Case("inspect-missing-arch-json", lambda e: ["inspect", str(e.no_arch)], "missing arch.json"),
    Case("init-output-exists", lambda e: ["init", str(e.existing)], "pass --overwrite"),
    Case("init-output-is-file", lambda e: ["init", str(e.afile)], "exists and is not a directory"),
    Case("forward-missing-arch-json", lambda e: ["forward", str(e.no_arch)], "missing arch.json"),
    Case("from-hf-missing-dir", lambda e: ["convert", "from-hf", str(e.cwd / "nope"), str(e.new)], "does not exist"),
    Case("from-hf-output-exists", lambda e: ["convert", "from-hf", str(e.hf_bin), str(e.existing)], "pass --overwrite"),
    Case("from-hf-input-is-file", lambda e: ["convert", "from-hf", str(e.afile), str(e.new)],
         "is a file, not a directory"),
    Case("to-hf-missing-arch-json", lambda e: ["convert", "to-hf", str(e.no_arch), str(e.new)], "missing arch.json"),
    Case("to-hf-output-exists", lambda e: ["convert", "to-hf", str(e.model), str(e.existing)], "--overwrite"),
    Case("data-prepare-missing-source", lambda e: ["data", "prepare", f"txt:{e.cwd}/nope/*.txt", str(e.new),
                                                   f"--tokenizer={e.tok}", "--seq-len=32"], "nope"),
    Case("data-prepare-output-exists", lambda e: ["data", "prepare", e.txt, str(e.existing), f"--tokenizer={e.tok}",
                                                  "--seq-len=32", "--workers=1"], "--overwrite"),
    Case("data-prepare-missing-tokenizer", lambda e: ["data", "prepare", e.txt, str(e.new),
                                                      f"--tokenizer={e.cwd / 'nope'}"], "nope"),
    Case("data-tokenizer-output-exists", lambda e: ["data", "train-tokenizer", e.txt, str(e.corpus / "tokenizer"),
                                                    "--vocab-size=300"], "--overwrite"),
    Case("data-tokenizer-missing-source", lambda e: ["data", "train-tokenizer", f"txt:{e.cwd}/nope/*.txt",
                                                     str(e.new), "--vocab-size=300"], "nope"),
    Case("data-inspect-missing-dir", lambda e: ["data", "inspect", str(e.cwd / "nope")], "no prepared dataset"),
    Case("data-builtin-vocab-too-small", lambda e: ["data", "builtin", "--data-dir", str(e.new), "--vocab-size=5"],
         "vocab_size=5 must be >= 259"),
    Case("data-builtin-workers", lambda e: ["data", "builtin", "--data-dir", str(e.new), "--workers=0"],
         "--workers=0 must be >= 1"),
    Case("prune-missing-input", lambda e: prune(e, model=e.cwd / "nope"), "does not exist"),
    Case("prune-input-missing-arch-json", lambda e: prune(e, model=e.no_arch), "missing arch.json"),
    Case("prune-output-exists", lambda e: prune(e, f"--config.prune.output={e.existing}"), "pass --overwrite"),
    Case("prune-output-not-set", lambda e: ["prune", f"--config.prune.input={e.model}"], "prune.output is not set"),
    Case("train-data-missing", lambda e: train(e, f"--config.data.train={e.cwd / 'nope'}"), "no prepared dataset"),
    Case("train-init-missing-arch-json", lambda e: train(e, f"--config.train.init={e.no_arch}"), "missing arch.json"),
    Case("train-teacher-missing", lambda e: train(e, f"--config.train.teacher={e.cwd / 'nope'}"), "does not exist"),
    Case("train-masks-from-dense", lambda e: train(e, f"--config.train.masks_from={e.model}"), "has no masks"),
    Case("train-init-and-masks-from", lambda e: train(e, f"--config.train.init={e.model}",
                                                      f"--config.train.masks_from={e.model}"), "not both"),
    Case("train-validation-missing", lambda e: train(e, f"--config.data.validation={e.cwd / 'nope'}"),
         "no prepared dataset"),
    Case("eval-missing-model", lambda e: ["eval", str(e.cwd / "nope"), "--tasks=none", "--perplexity=none"],
         "does not exist"),
    Case("eval-out-exists", lambda e: ["eval", str(e.model), "--out", str(e.afile)], "pass --overwrite"),
    Case("study-status-empty-root", lambda e: ["study", "status", "--root", str(e.existing)], "no study has run"),
    Case("study-run-unknown-only", lambda e: study(e, "run", "--only", "nope"), "no run named 'nope'"),
    Case("study-run-no-data",
         lambda e: ["study", "run", "--root", str(e.new), "--config.study.variants=('wanda@0.5',)"],
         "data.train is not set"),
    Case("study-imported-missing",
         lambda e: study(e, "run", f"--config.study.imported.Meta={e.cwd / 'nope'}",
                         "--config.study.variants=('wanda@0.5 parents=Meta',)"), "study.imported.Meta: model dir"),
    Case("study-report-no-results", lambda e: study(e, "report"), "no evaluated runs"),
    Case("study-name-escapes-root", lambda e: ["study", "run", "--config.study.name=../../etc"],
         "study.name '../../etc' cannot name a directory"),
    # --- shapes
    Case("forward-heads-not-dividing", lambda e: ["forward", "--config.model.arch.num_heads=5",
                                                  "--config.model.arch.head_dim=None"], "num_heads"),
    Case("init-kv-heads-not-dividing", lambda e: ["init", str(e.new), "--config.model.arch.num_kv_heads=3"],
         "num_kv_heads"),
    Case("prune-ratio-above-one", lambda e: prune(e, "--config.prune.ratio=1.5"), "prune.ratio=1.5 must be in (0, 1)"),
    Case("prune-ratio-zero", lambda e: prune(e, "--config.prune.ratio=0"), "prune.ratio=0.0 must be in (0, 1)"),
    Case("prune-pattern-3of2", lambda e: prune(e, "--config.prune.pattern=3:2"), "needs 0 < N < M"),
    Case("prune-pattern-2of3-wanda", lambda e: prune(e, config=f"{PRUNE}/wanda.py:2:3"), "divisible by 3"),
    Case("prune-magnitude-ratio-mismatch", lambda e: prune(e, "--config.prune.method=magnitude",
                                                           "--config.prune.pattern=1:4"), "set prune.ratio=0.25"),
    Case("prune-sparsegpt-blocksize", lambda e: pmethod(e, "sparsegpt", "--config.prune.sparsegpt.blocksize=0"),
         "prune.sparsegpt.blocksize=0"),
    Case("prune-depth-with-nm",
         lambda e: pmethod(e, "minitron_depth", "--config.prune.pattern=2:4", "--config.prune.ratio=0.5"),
         "is for sparse methods"),
    Case("prune-depth-too-many-layers",
         lambda e: pmethod(e, "minitron_depth", "--config.prune.minitron_depth.layers_removed=2"),
         "layers_removed=2"),
    Case("prune-width-ffn-without-hidden", lambda e: prune(e, "--config.prune.method=minitron_width",
                                                           "--config.prune.minitron_width.ffn_size=64"),
         "needs prune.minitron_width.hidden_size"),
    Case("prune-width-shape-too-large",
         lambda e: pmethod(e, "minitron_width", "--config.prune.minitron_width.hidden_size=4096"),
         "must fit the parent's hidden 64"),
    Case("prune-width-bad-aggregation",
         lambda e: pmethod(e, "minitron_width", "--config.prune.minitron_width.aggregation=l2"),
         "prune.minitron_width.aggregation='l2' is not valid; choose one of paper, nemo"),
    Case("prune-flap-al-am", lambda e: pmethod(e, "flap", "--config.prune.flap.structure=AL-AM"),
         "AL-AM"),
    Case("prune-flap-bad-heads", lambda e: pmethod(e, "flap", "--config.prune.flap.num_heads=3",
                                                 "--config.prune.ratio=0.5"), "num_heads=3"),
    Case("prune-sheared-lambda-lr", lambda e: pmethod(e, "sheared_llama", "--config.prune.sheared_llama.lambda_lr=1.0"),
         "lambda_lr=1.0"),
    Case("study-variant-ratio", lambda e: study(e, "plan", "--config.study.variants=('wanda@1.5',)"),
         "ratio 1.5 must be in (0, 1)"),
    Case("study-variant-nm-for-depth",
         lambda e: study(e, "plan", "--config.study.variants=('minitron_depth/2:4@0.5',)"),
         "does not exist for minitron_depth"),
    Case("from-hf-heads-not-dividing-hidden", lambda e: ["convert", "from-hf", str(e.hf_heads), str(e.new)],
         "num_attention_heads=5, which does not divide hidden_size=64"),
    Case("from-hf-kv-heads-not-dividing", lambda e: ["convert", "from-hf", str(e.hf_kv), str(e.new)],
         "arch.num_heads=4 is not divisible by arch.num_kv_heads=3"),
    # --- ranges
    Case("study-overlapping-budgets", lambda e: study(e, "plan", "--config.study.retrain_from=4K"), "overlap"),
    Case("study-budget-larger-than-data", lambda e: study(e, "run", "--config.study.retrain_tokens=('1B',)"),
         "retrain_1B"),
    Case("train-range-not-defined", lambda e: train(e, "--config.data.range=nope"), "data.range='nope'"),
    Case("train-budget-larger-than-data", lambda e: train(e, "--config.train.tokens=1B"), "were asked for"),
    Case("train-budget-malformed", lambda e: train(e, "--config.data.budgets.all=0:lots"), "lots"),
    # --- dtypes
    Case("to-hf-dtype-float8", lambda e: ["convert", "to-hf", str(e.model), str(e.new), "--dtype", "float8"],
         "'float8'"),
    Case("forward-dtype-float8", lambda e: ["forward", "--config.model.dtype=float8"], "float8"),
    Case("prune-dtype-float8", lambda e: prune(e, "--config.model.dtype=float8"), "float8"),
    # --- tokenizers
    Case("train-data-other-tokenizer", lambda e: train(e, f"--config.train.init={e.model_other}"),
         "was tokenized with tokenizer"),
    Case("prune-calibration-other-tokenizer", lambda e: prune(e, model=e.model_other), "was tokenized with tokenizer"),
    Case("eval-other-tokenizer", lambda e: ["eval", str(e.model), "--tokenizer", str(e.other_tok), "--tasks=none",
                                            "--perplexity=none", "--no-progress"], "was trained with tokenizer"),
    Case("data-inspect-other-tokenizer", lambda e: ["data", "inspect", str(e.train), "--sequence=0",
                                                    f"--tokenizer={e.other_tok}"], "was tokenized with tokenizer"),
    # --- task names
    Case("eval-unknown-task", lambda e: ["eval", str(e.model), "--tasks", "piqa,nosuchtask"],
         "unknown task 'nosuchtask'"),
    Case("eval-write-tasks-unknown", lambda e: ["eval", "--write-tasks", str(e.new), "--tasks", "nosuchtask"],
         "unknown task 'nosuchtask'"),
    Case("study-unknown-task", lambda e: study(e, "plan", "--config.eval.tasks=('nosuchtask',)"),
         "unknown task 'nosuchtask'"),
    # --- topologies and meshes
    Case("compile-unknown-topology", lambda e: ["compile", "--topology", "v9-12"], "unknown TPU topology 'v9-12'"),
    Case("compile-impossible-mesh", lambda e: ["compile", "--topology", "v4-8", "--config.mesh.tensor=8"],
         "cannot fill 4 devices"),
    Case("train-impossible-mesh", lambda e: train(e, "--config.mesh.data=3"),
         "'data': 3, 'fsdp': -1, 'tensor': 1} cannot fill"),
    Case("mesh-two-fill-axes", lambda e: ["forward", "--config.mesh.data=-1"], "at most one mesh axis"),
    # --- corrupted files
    Case("inspect-arch-not-json", lambda e: ["inspect", str(e.bad_arch)], "arch.json is not valid JSON"),
    Case("forward-arch-not-json", lambda e: ["forward", str(e.bad_arch)], "arch.json is not valid JSON"),
    Case("data-inspect-truncated-manifest", lambda e: ["data", "inspect", str(e.bad_manifest)], "manifest.json"),
    Case("train-truncated-manifest", lambda e: train(e, f"--config.data.train={e.bad_manifest}"), "manifest.json"),
    Case("prune-calibration-truncated-manifest", lambda e: prune(e, f"--config.prune.calibration={e.bad_manifest}"),
         "manifest.json"),
    Case("from-hf-corrupt-safetensors", lambda e: ["convert", "from-hf", str(e.hf_corrupt), str(e.new)],
         "model.safetensors: Error while deserializing header"),
    Case("from-hf-config-not-an-object", lambda e: ["convert", "from-hf", str(e.hf_list), str(e.new)],
         "config.json holds a JSON list"),
    # --- no pickles
    Case("from-hf-pickle-only", lambda e: ["convert", "from-hf", str(e.hf_bin), str(e.new)], "pytorch_model.bin"),
]


def check_one_line_error(code: int, out: str, err: str, expected: str) -> None:
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert "Traceback" not in out + err, err
    assert err.startswith("maxprune: error: ") and err.count("\n") == 1, f"not one error line:\n{err}"
    assert expected in err, f"{expected!r} not in {err!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # outputs that default to ./runs, ./bench_step land here and are seen
    monkeypatch.setenv("MAXPRUNE_DATA_DIR", str(tmp_path / "data_dir"))
    env = Env.make(inputs, tmp_path)
    argv = [str(a) for a in case.argv(env)]
    before = snapshot(inputs.root, inputs.corpus, tmp_path)
    code = main(argv)
    out, err = capsys.readouterr()
    check_one_line_error(code, out, err, case.expected)
    assert snapshot(inputs.root, inputs.corpus, tmp_path) == before


class _Names:
    """Stands in for `Env` when only the command words of a case are wanted."""

    def __getattr__(self, name):
        return {k: Path(k) for k in ("syntax", "unknown", "wrongtype", "noarg")} if name == "cfg" else Path(name)


def test_matrix_covers_every_command():
    from maxprune.commands import all_commands
    argvs = [[str(a) for a in case.argv(_Names())] for case in CASES]
    assert {c.name for c in all_commands()} <= {argv[0] for argv in argvs}
    assert {tuple(argv[:2]) for argv in argvs if argv[0] in ("convert", "data", "study")} >= {
        ("convert", "from-hf"), ("convert", "to-hf"), ("data", "builtin"), ("data", "prepare"),
        ("data", "train-tokenizer"), ("data", "inspect"), ("study", "plan"), ("study", "run"),
        ("study", "status"), ("study", "report")}
    methods = {Path(a.split("=")[1].split(":")[0]).stem for argv in argvs for a in argv
               if a.startswith(("--config.prune.method=", f"--config={PRUNE}"))}
    assert methods >= {"magnitude", "wanda", "sparsegpt", "minitron_depth", "minitron_width", "flap", "sheared_llama"}
    assert len(CASES) >= 45


# ------------------------------------------------------------------ the console script
@pytest.mark.parametrize("argv, expected", [
    (["convert", "to-hf", "nope", "out", "--dtype", "float8"], "'float8'"),
    (["inspect", "nope_dir"], "nope_dir does not exist"),
    (["forward", "--config.model.bogus=1"], "unknown config key 'model.bogus'"),
    (["compile", "--topology", "v9-12"], "unknown TPU topology 'v9-12'"),
])
def test_console_prints_no_traceback(argv, expected, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "maxprune", *argv], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    check_one_line_error(result.returncode, result.stdout, result.stderr, expected)
    assert not any(tmp_path.iterdir())
