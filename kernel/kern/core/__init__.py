"""The plugin core: the plugin manager and hook routing, job configuration, file I/O, the kernel's own hooks."""
