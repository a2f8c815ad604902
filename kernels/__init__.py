"""Triton kernels, importable as stage1.kernels (this folder is mapped into the package by setup.py)."""
