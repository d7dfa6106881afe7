"""sidrec kernels: the device-side prefix trie, the fused beam step (PyTorch reference + Triton), and
the fused CPU attention of a wide decode step (C, built on first use).

Imports nothing from `training/` or `service/`.
"""
