"""Sharded training over a device mesh (`--mesh`) and multi-process runs: partition rules, placement, steps."""
