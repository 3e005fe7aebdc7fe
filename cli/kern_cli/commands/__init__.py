"""One module per subcommand; each defines a click command called ``command``."""

from kern_cli.commands import convert, merge, plugins, train

COMMANDS = [plugins.command, train.command, merge.command, convert.command]
