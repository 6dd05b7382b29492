"""Pruning: methods registered by name (`api`) that turn a parent model dir and calibration tokens into a
smaller or sparser one (`run`); the layer-loop `engine`, the `sparse`, `structured` and `sheared` methods."""
