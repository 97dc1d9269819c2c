"""Fused dequant-matmul kernels for packed low-bit deltas (GPU: Pallas/Triton, TPU: Mosaic).

Each op lives in its own sub-package with `reference.py` (the spec, pure jnp), `pallas_gpu.py`,
`pallas_tpu.py` (and, for quant_matmul, `mosaic_gpu.py`) and a dispatcher in `__init__.py` whose
`IMPLEMENTATIONS` table (name -> module) lists what its `implementation=` accepts besides "auto".
The packed format is defined in `packing.py`.
This package imports only jax and numpy.
"""
