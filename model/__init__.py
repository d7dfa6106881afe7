"""sidrec model package: the SID transformer, its KV-cached decoder, beam search and bundle I/O.

Imports nothing from `training/` or `service/`: serving loads a bundle with only this package
and `kernels/` present.
"""
