"""Triton kernels for fastgpt (filled in by the kernels work). Importable without triton."""
