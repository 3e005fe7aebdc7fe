"""kern plugin: lokr."""
