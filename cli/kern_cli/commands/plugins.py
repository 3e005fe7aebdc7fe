"""``kern plugins``: what is installed, as a table or JSON."""

from __future__ import annotations

import json

import click
from kern.core.plugins import get_manager


@click.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object with a list of plugins) for machines.")
@click.option("--all", "show_all", is_flag=True, help="Also list the kernel's own default hooks.")
def command(as_json: bool, show_all: bool) -> None:
    """List installed plugins: distribution, version, architectures, networks, hooks.

    Plugins are found through the `kern.plugins` entry-point group. Set KERN_PLUGINS=a,b to load
    only those, KERN_DISABLE_PLUGINS=a,b to skip some, KERN_DISABLE_PLUGIN_AUTOLOAD=1 to load none.
    A plugin that failed to load is listed with its error; the exit code is still 0.
    """
    manager = get_manager()
    infos = [i for i in manager.infos.values() if show_all or i.name != "kern"]
    if as_json:
        payload = {
            "plugins": [i.as_dict() for i in infos],
            "architectures": {
                a.name: {"aliases": list(a.aliases), "variants": [v.name for v in a.variants]}
                for a in manager.architectures.values()
            },
            "networks": {n.name: {"options": [o.name for o in n.options]} for n in manager.networks.values()},
        }
        click.echo(json.dumps(payload, indent=2))
        return
    rows = [("PLUGIN", "DISTRIBUTION", "VERSION", "STATUS", "ARCHITECTURES", "NETWORKS", "HOOKS")]
    for i in infos:
        rows.append(
            (
                i.name,
                i.distribution,
                i.version,
                i.status,
                ",".join(i.architectures) or "-",
                ",".join(i.networks) or "-",
                ",".join(i.hooks) or "-",
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1])
    for i in infos:
        if i.error:
            click.echo(f"\n{i.name} ({i.distribution} {i.version}): {i.error}", err=True)
