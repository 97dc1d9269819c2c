"""Fused dequant-matmul kernels for packed low-bit deltas (GPU: Pallas/Triton, TPU: Mosaic).

Each op lives in its own sub-package with `reference.py` (the spec, pure jnp), `pallas_gpu.py`,
`pallas_tpu.py` and a dispatcher in `__init__.py`. The packed format is defined in `packing.py`.
This package imports only jax and numpy.
"""
