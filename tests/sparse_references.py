"""Independent NumPy float64 transcriptions of the sparse methods' original code, in torch's ``[out, in]``
layout, one calibration sequence at a time (locuslab/wanda ``prune_wanda`` / ``prune_magnitude``,
IST-DASLab/sparsegpt ``SparseGPT.add_batch`` + ``fasterprune``; docs/methods.md). They call nothing of
maxprune's pruning code."""

import numpy as np


def ref_wanda_metric(w_OI, x_NLI):
    """|W| · sqrt(scaler) [out, in], the scaler a running mean over sequences (WrappedGPT.add_batch)."""
    scaler, nsamples = np.zeros(w_OI.shape[1]), 0
    for x_LI in x_NLI:  # a batch of one sequence
        scaler *= nsamples / (nsamples + 1)
        nsamples += 1
        scaler += np.linalg.norm(x_LI, axis=0) ** 2 / nsamples
    return np.abs(w_OI) * np.sqrt(scaler)[None, :]


def ref_wanda(w_OI, x_NLI, ratio, nm=None):
    """Keep-mask [out, in] of locuslab/wanda's prune_wanda for one linear."""
    O, I = w_OI.shape
    metric = ref_wanda_metric(w_OI, x_NLI)
    pruned = np.zeros((O, I), bool)
    rows = np.arange(O)[:, None]
    if nm:
        n, m = nm
        for ii in range(0, I, m):
            idx = np.argsort(metric[:, ii:ii + m], axis=1, kind="stable")[:, :n]
            pruned[rows, ii + idx] = True
    else:
        idx = np.argsort(metric, axis=1, kind="stable")[:, :int(I * ratio)]
        pruned[rows, idx] = True
    return ~pruned


def ref_magnitude(w_OI, ratio, nm=None):
    metric = np.abs(w_OI)
    if nm:
        return ref_wanda(w_OI, np.ones((1, 1, w_OI.shape[1])), ratio, nm)  # |W| * 1
    thresh = np.sort(metric.ravel())[int(w_OI.size * ratio)]
    return ~(metric <= thresh)


def ref_hessian(x_NLI):
    I = x_NLI.shape[-1]
    H, nsamples = np.zeros((I, I)), 0
    for x_LI in x_NLI:
        H *= nsamples / (nsamples + 1)
        nsamples += 1
        x = np.sqrt(2 / nsamples) * x_LI.T.astype(np.float64)
        H += x @ x.T
    return H


def ref_sparsegpt(w_OI, x_NLI, ratio, nm=None, blocksize=128, percdamp=0.01):
    """(updated weight [out, in], keep-mask [out, in]) of SparseGPT.fasterprune."""
    W = np.array(w_OI, np.float64)
    O, I = W.shape
    H = ref_hessian(x_NLI)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[np.diag_indices(I)] += percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper factor of H^-1
    pruned = np.zeros((O, I), bool)
    rows = np.arange(O)[:, None]
    for i1 in range(0, I, blocksize):
        i2 = min(i1 + blocksize, I)
        W1, Hinv1 = W[:, i1:i2].copy(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = np.zeros_like(W1), np.zeros_like(W1)
        if nm is None:
            tmp = W1 ** 2 / np.diag(Hinv1)[None, :] ** 2
            mask1 = tmp <= np.sort(tmp.ravel())[int(tmp.size * ratio)]
        else:
            mask1 = np.zeros_like(W1, bool)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if nm and i % nm[1] == 0:
                tmp = W1[:, i:i + nm[1]] ** 2 / np.diag(Hinv1)[i:i + nm[1]][None, :] ** 2
                mask1[rows, i + np.argsort(tmp, axis=1, kind="stable")[:, :nm[0]]] = True
            q = w.copy()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, ~pruned
