"""Entry point of the loha plugin: the hook implementations kern calls."""

import kern  # noqa: F401
