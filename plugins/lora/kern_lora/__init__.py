"""kern plugin: lora."""
