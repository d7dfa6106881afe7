"""sidrec kernels: the device-side prefix trie and the fused beam step (PyTorch reference + Triton).

Imports nothing from `training/` or `service/`.
"""
