"""Triton kernels of msidtrans_fast (installed as ``msidtrans_fast.kernels``)."""
