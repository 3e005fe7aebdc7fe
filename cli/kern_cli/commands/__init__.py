"""One module per subcommand; each defines a click command called ``command``."""

from kern_cli.commands import cache, convert, generate, import_musubi, merge, plugins, train

COMMANDS = [
    plugins.command,
    train.command,
    cache.command,
    generate.command,
    merge.command,
    convert.command,
    import_musubi.command,
]
