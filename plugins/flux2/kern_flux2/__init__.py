"""kern plugin: flux2."""
