"""Adapters: the network runtime, adapter files, merging, converting and streaming tensors."""
