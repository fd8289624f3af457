"""High-resolution cross-attention (FASeg's HRCA): top-k selection and sparse cross-attention.
So far the pure-PyTorch reference (reference.py); kernels, custom ops and the module follow."""
