"""GPU implementations: CuPy RawModule kernels (``cuda_kernels/*.cu``) and numba.cuda kernels."""
