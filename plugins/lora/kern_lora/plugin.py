"""Entry point of the lora plugin: the hook implementations kern calls."""

import kern  # noqa: F401
