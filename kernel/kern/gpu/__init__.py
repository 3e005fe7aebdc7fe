"""The GPU fast paths: attention, compiled and checkpointed blocks, fp8, block swap, several GPUs."""
