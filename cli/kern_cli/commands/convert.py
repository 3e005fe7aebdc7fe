import click


@click.command(name="convert")
def command() -> None:
    """(being written)"""
    raise click.UsageError("not available yet")
