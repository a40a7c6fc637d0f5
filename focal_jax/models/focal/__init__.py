"""Focal Transformer (v1) attention: focal self-attention over windows, rings and pooled
levels, its static index tables and window slicing."""
