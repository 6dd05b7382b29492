"""The layer loop every calibration-based pruner runs on: `layer` (linears, sites, protocols), `options`,
`activations` (calibration chunks), `passes` (the jitted programs), `stack_writer` (in-place writes), `loop`
(`prune_layerwise`, `collect_stats`; its docstring is the engine's design)."""
