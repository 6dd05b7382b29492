"""lm-eval's model interface on a maxprune model dir, registered as ``maxprune``.

No HF export is needed: requests run through the JAX model with its (sharded)
params and masks. From Python::

    import maxprune.eval.lm_eval_adapter  # registers "maxprune"
    lm_eval.simple_evaluate(model="maxprune", model_args="path=runs/x/model", tasks=[...])

and from the shell, lm-eval's own CLI with the model registered::

    python -m maxprune.eval run --model maxprune --model_args path=runs/x/model --tasks piqa

What it computes is what lm-eval's ``hf`` backend computes, request for request:

- **Tokens.** Context and continuation are encoded together and split where the
  context's tokens end (lm-eval's `_encode_pair`); an empty context is replaced
  by BOS. **BOS** is prepended to every encoded request (``add_bos_token=True``),
  as the hf backend does with a Llama-3 tokenizer, whose post-processor adds
  ``<|begin_of_text|>`` — the paper's setup, and how maxprune trains (every
  document starts with BOS). An HF export matches it with the hf backend's
  ``add_bos_token=True``. ``add_bos_token=False`` encodes without BOS.
- **Loglikelihood.** ``(context + continuation)[-(max_length + 1):]`` is scored
  and the continuation's log-probs are summed; ``is_greedy`` says whether every
  continuation token is the argmax. `max_length` defaults to the model's
  ``max_position_embeddings``, the hf backend's default.
- **Rolling loglikelihood.** lm-eval's own disjoint rolling windows, prefix BOS.
- **generate_until.** Greedy only, stopping at EOS, a stop string or
  ``max_gen_toks``; the context is left-truncated to leave room. It reruns the
  full forward per new token (no KV cache): correct, simple, and slow for long
  generations, which none of the paper's eight tasks use.

Loglikelihood requests are packed: several go into one row of `pack_length`
(256) tokens, or of the bucket of the longest request, each attending only to
itself with positions from 0, so each scores exactly as it would alone while
the model runs on few padding tokens (ARC-Easy's 40-token requests padded to
32/64/128 had cost 2x the tokens). Only the continuation's positions go
through the lm_head and the softmax: the context needs none, and at a
128-token request with a 5-token answer that is most of the head's work.
Shapes come from a few bucket lengths (powers of two from `min_bucket` up to
`max_length`), power-of-two row counts and continuation buckets, so the model
compiles a handful of times per task (`compile_count`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import lm_eval.models  # noqa: F401  registers lm-eval's own models first: lm-eval 0.4.13 loads them only

#                                    into an empty registry, so registering ours first would hide `hf`.
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from maxprune.errors import MaxpruneError

if TYPE_CHECKING:
    from maxprune.eval.loading import EvalModel


@register_model("maxprune")
class MaxpruneLM(TemplateLM):
    """An lm-eval LM over a maxprune model dir (`path`) or an already loaded `EvalModel`."""

    backend = "causal"

    def __init__(self, path: str | None = None, *, model: EvalModel | None = None, tokenizer: str | None = None,
                 batch_size: int | str = 32, batch_tokens: int | None = 32768, max_length: int | None = None,
                 min_bucket: int = 32, pack_length: int = 256, add_bos_token: bool = True,
                 dtype: str = "float32",
                 mesh: str | None = None, max_gen_toks: int = 256, device=None, max_batch_size=None):
        """`batch_size` sequences per forward at most, fewer in long buckets so that rows x length stays
        near `batch_tokens`. `mesh` is "DATAxFSDPxTENSOR" (e.g. "1x-1x1"). `device` and
        `max_batch_size` are lm-eval's generic arguments, accepted and ignored (JAX places the model).
        Loglikelihood requests are packed several to a row of at least `pack_length` tokens."""
        super().__init__()
        from maxprune.eval.scoring import bucket_lengths  # JAX loads with the model, not with lm-eval's registry
        if (path is None) == (model is None):
            raise MaxpruneError("MaxpruneLM needs exactly one of path=MODEL_DIR or model=EvalModel")
        if model is None:
            from maxprune import sharding
            from maxprune.eval.loading import load_for_eval
            from maxprune.model.llama import ModelOptions
            model = load_for_eval(path, tokenizer=tokenizer, mesh=sharding.make_mesh(_mesh_config(mesh)),
                                  options=ModelOptions(dtype=dtype))
        self.model = model
        self.tokenizer = model.tokenizer
        self.add_bos_token = bool(add_bos_token)
        self._max_length = int(max_length or model.arch.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        if int(pack_length) < 1:
            raise MaxpruneError(f"pack_length={pack_length} must be >= 1")
        self.pack_length = min(int(pack_length), self._max_length)
        size = 32 if str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = model.scorer(size, bucket_lengths(self._max_length, int(min_bucket)),
                                   int(batch_tokens) if batch_tokens else None)

    # ------------------------------------------------------------ lm-eval's properties
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # what an empty context and rolling windows condition on

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def compile_count(self) -> int:
        """XLA compilations so far: a handful of packed shapes for scoring, one per bucket for
        generation."""
        return self.scorer.compile_count

    # ------------------------------------------------------------ tokens
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Like the hf backend: `add_special_tokens` if given, else `add_bos_token`, decides BOS."""
        bos = self.add_bos_token and (add_special_tokens is None or add_special_tokens)
        return self.tokenizer.encode(string, bos=bos)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode([tokens] if isinstance(tokens, int) else tokens)

    # ------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, all greedy) for (key, context ids, continuation ids)."""
        seqs = [_Scored.of(ctx, cont, self.max_length) for _, ctx, cont in requests]
        results: list = [None] * len(seqs)
        bar = tqdm(total=len(seqs), desc="maxprune loglikelihood", disable=disable_tqdm, dynamic_ncols=True)
        for group in self._groups(seqs):
            scored = self.scorer.score_packed([seqs[i].inputs for i in group], [seqs[i].targets for i in group],
                                              [seqs[i].n_cont for i in group], self.pack_length)
            for i, (logprob_T, greedy_T) in zip(group, scored):
                results[i] = (float(np.sum(logprob_T, dtype=np.float64)), bool(greedy_T.all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(group))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log-probs of each whole string, over lm-eval's disjoint rolling windows."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, ctx, cont))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop string (EOS text is always one)."""
        eos_text = self.tok_decode([self.eot_token_id])
        rows = [self._generation(context, gen_kwargs, eos_text) for context, gen_kwargs in
                (req.args for req in requests)]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
        bar = tqdm(total=len(rows), desc="maxprune generate", disable=disable_tqdm, dynamic_ncols=True)
        for start in range(0, len(order), self.scorer.rows):  # longest first: similar lengths together
            self._greedy([rows[i] for i in order[start:start + self.scorer.rows]])
            bar.update(min(self.scorer.rows, len(order) - start))
        bar.close()
        texts = [postprocess_generated_text(self.tok_decode(r.generated), r.until, None) for r in rows]
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    # ------------------------------------------------------------ helpers
    def _groups(self, seqs: list[_Scored]) -> list[list[int]]:
        """Indices, longest first, in groups of ~2,000 packed and scored together (the progress bar
        moves per group); sorting keeps one long request from widening the rows of many short ones,
        and sorting by content too makes the packing (and so the shapes) independent of order."""
        order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i].inputs), seqs[i].inputs.tobytes()))
        step = 64 * self.scorer.rows_for(self.scorer.bucket(self.pack_length))
        return [order[s:s + step] for s in range(0, len(order), step)]

    def _generation(self, context: str, gen_kwargs: dict, eos_text: str) -> _Generation:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
            raise ValueError(f"the maxprune lm-eval model generates greedily only; got {gen_kwargs}")
        until = handle_stop_sequences(kwargs.get("until"), eos=eos_text)
        max_new = int(kwargs["max_gen_toks"])
        if max_new >= self.max_length:
            raise ValueError(f"max_gen_toks={max_new} must be less than max_length={self.max_length}")
        context_ids = self.tok_encode(context)[-(self.max_length - max_new):]
        return _Generation(list(context_ids), max_new, until)

    def _greedy(self, rows: list[_Generation]) -> None:
        active = list(rows)
        while active:
            next_ids = self.scorer.next_tokens([np.asarray(r.tokens, np.int32) for r in active])
            for row, token in zip(active, next_ids):
                row.step(int(token), self.eot_token_id, self.tok_decode)
            active = [r for r in active if not r.done]


@dataclasses.dataclass
class _Scored:
    inputs: np.ndarray
    targets: np.ndarray
    n_cont: int

    @classmethod
    def of(cls, context: list[int], continuation: list[int], max_length: int) -> _Scored:
        """The window of the last `max_length` + 1 tokens; a continuation longer than the
        window is scored on its last `max_length` tokens (the hf backend asserts instead)."""
        if not context or not continuation:
            raise ValueError("a loglikelihood request needs a non-empty context and continuation")
        full = np.asarray((list(context) + list(continuation))[-(max_length + 1):], np.int32)
        return cls(full[:-1], full[1:], min(len(continuation), max_length))


@dataclasses.dataclass
class _Generation:
    tokens: list[int]
    max_new: int
    until: list[str]
    generated: list[int] = dataclasses.field(default_factory=list)
    done: bool = False

    def step(self, token: int, eos_id: int, decode) -> None:
        if token == eos_id:
            self.done = True
            return
        self.tokens.append(token)
        self.generated.append(token)
        text = decode(self.generated)
        self.done = len(self.generated) >= self.max_new or any(u and u in text for u in self.until)


def _mesh_config(spec: str | None):
    """ "DATAxFSDPxTENSOR" -> a mesh config (None: all devices on fsdp)."""
    if spec is None:
        return None
    from ml_collections import ConfigDict
    try:
        data, fsdp, tensor = (int(x) for x in str(spec).split("x"))
    except ValueError:
        raise MaxpruneError(f"mesh={spec!r} must be DATAxFSDPxTENSOR, e.g. 1x-1x1") from None
    return ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})
