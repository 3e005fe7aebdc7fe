"""Entry point of the qwen_image plugin: the hook implementations kern calls."""

import kern  # noqa: F401
