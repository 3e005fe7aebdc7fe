import click


@click.command(name="merge")
def command() -> None:
    """(being written)"""
    raise click.UsageError("not available yet")
