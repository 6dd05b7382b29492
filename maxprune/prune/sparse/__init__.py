"""Sparse methods: magnitude, Wanda, SparseGPT (unstructured and N:M masks), and their reports."""
