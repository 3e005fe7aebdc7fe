"""kern plugin: loha."""
