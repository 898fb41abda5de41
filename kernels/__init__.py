"""Triton kernels of fastcl (installed as ``fastcl.kernels``).

Import lazily: ``triton.jit`` decides between compiled and interpreted kernels
(``TRITON_INTERPRET=1``) when this package is first imported.
"""
