"""The training driver and what a run owns: state on disk, the run folder, metrics, optimisers."""
