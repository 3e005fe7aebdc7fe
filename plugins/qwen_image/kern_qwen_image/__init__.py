"""kern plugin: qwen_image."""
