"""`forward` (the smoke test), `init` (a random model dir) and `inspect` (look inside one)."""

from __future__ import annotations

import json
import math
import time

from maxprune.commands import Command
from maxprune.errors import MaxpruneError


def _add_forward(parser) -> None:
    parser.add_argument("model_dir", nargs="?", metavar="MODEL_DIR",
                        help="model dir to load (default: random init from the config)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")


def _run_forward(args, cfg) -> int:
    """One jitted forward pass on random tokens: checks the model runs and its loss is sane."""
    if args.batch < 1 or args.seq_len < 2:
        raise MaxpruneError(f"--batch={args.batch} must be >= 1 and --seq-len={args.seq_len} >= 2")
    import jax

    from maxprune.model import llama

    arch, params, masks = _load_or_init(args.model_dir, cfg)
    if args.seq_len > arch.max_position_embeddings:
        raise MaxpruneError(f"--seq-len={args.seq_len} exceeds the model's "
                            f"max_position_embeddings={arch.max_position_embeddings}")
    options = llama.ModelOptions.from_config(cfg.model)
    tokens_BL = jax.random.randint(jax.random.key(cfg.seed + 1), (args.batch, args.seq_len),
                                   0, arch.vocab_size)

    def step(params, masks, tokens_BL):
        logits_BLV = llama.forward(params, tokens_BL, arch, masks=masks, options=options)
        return logits_BLV, llama.next_token_loss(logits_BLV, tokens_BL)

    start = time.perf_counter()
    compiled = jax.jit(step).lower(params, masks, tokens_BL).compile()
    compiled_at = time.perf_counter()
    logits_BLV, loss = jax.block_until_ready(compiled(params, masks, tokens_BL))
    done = time.perf_counter()
    print(f"arch     {_summary(arch)}")
    print(f"params   {arch.num_params():,}")
    print(f"logits   {tuple(logits_BLV.shape)} {logits_BLV.dtype}")
    print(f"loss     {float(loss):.4f} (ln vocab = {math.log(arch.vocab_size):.4f})")
    print(f"time     compile {compiled_at - start:.2f} s, run {1e3 * (done - compiled_at):.1f} ms "
          f"on {jax.devices()[0].platform}")
    return 0


def _add_init(parser) -> None:
    parser.add_argument("out", metavar="OUT", help="model dir to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _run_init(args, cfg) -> int:
    import jax

    from maxprune.fs import staged
    from maxprune.model import llama, model_dir
    from maxprune.model.schema import arch_from_config

    staged.check_output_dir(args.out, args.overwrite)  # before a possibly long init
    arch = arch_from_config(cfg)
    params = llama.init_params(arch, jax.random.key(cfg.seed))
    provenance = {"method": "init", "parent": None, "seed": cfg.seed, "config": cfg.to_dict()}
    model_dir.save_model_dir(args.out, arch, params, masks=None, provenance=provenance,
                             overwrite=args.overwrite)
    print(f"wrote {args.out}: {_summary(arch)}, {arch.num_params():,} params")
    return 0


def _add_inspect(parser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model dir to describe")


def _run_inspect(args, cfg) -> int:
    from maxprune.model import masks as masks_lib
    from maxprune.model.model_dir import load_model_dir

    md = load_model_dir(args.model_dir)
    for name, value in md.arch.to_dict().items():
        print(f"{name:26} {value}")
    # Masked-out weights count as zero even if a writer left them in the kernel.
    nonzero = masks_lib.count_nonzero_prunable(masks_lib.apply_masks(md.params, md.masks))
    total = md.arch.num_prunable_params()
    print(f"{'params (dense)':26} {md.arch.num_params():,}")
    print(f"{'prunable non-zero':26} {nonzero:,} of {total:,} ({1 - nonzero / total:.2%} sparse)")
    print(f"{'masks':26} {'present' if md.masks else 'absent (dense)'}")
    if md.masks:
        _print_mask_check(md)
    print(f"{'provenance':26} {json.dumps(md.provenance, indent=2, sort_keys=True, default=str)}")
    return 0


def _print_mask_check(md) -> None:
    """Verify the masks (bool, shapes, exact zeros under them, N:M if the provenance says so); per-kernel sparsity."""
    from maxprune.prune.sparse.report import verify_masks

    pattern = md.provenance.get("pattern")
    pattern = pattern if isinstance(pattern, str) and ":" in pattern else None
    per_kernel = verify_masks(md.params, md.masks, pattern)
    for name, value in per_kernel.items():
        print(f"{'  sparsity ' + name:26} {value:.2%}")
    print(f"{'masks verified':26} bool, shaped like their kernels, masked weights exactly zero"
          + (f", valid {pattern}" if pattern else ""))


def _load_or_init(path: str | None, cfg):
    """(arch, params, masks) from a model dir, or a random init of the config's arch."""
    if path:
        from maxprune.model.model_dir import load_model_dir
        md = load_model_dir(path)
        return md.arch, md.params, md.masks
    import jax

    from maxprune.model import llama
    from maxprune.model.schema import arch_from_config
    arch = arch_from_config(cfg)
    return arch, llama.init_params(arch, jax.random.key(cfg.seed)), None


def _summary(arch) -> str:
    return (f"vocab {arch.vocab_size}, hidden {arch.hidden_size}, layers {arch.num_layers}, "
            f"heads {arch.num_heads}/{arch.num_kv_heads} kv x {arch.head_dim}, ffn {arch.ffn_size}")


COMMANDS = [
    Command("forward", "run one forward pass on random tokens (smoke test)", _add_forward, _run_forward),
    Command("init", "write a randomly initialised model dir", _add_init, _run_init),
    Command("inspect", "describe a model dir: arch, parameters, sparsity, provenance",
            _add_inspect, _run_inspect, takes_config=False, multihost=False),
]
