"""Suite-wide settings."""

from vlmbackdoor_bench.allocator import keep_freed_memory

keep_freed_memory()  # as `vbb` does: the tests encode images at the same speed (allocator.py)
