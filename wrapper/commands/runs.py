import json

import click


@click.command(help="List runs (all, or those of recipe NAME): status, steps, final loss, duration.")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per run, for scripts")
def command(name, as_json):
    from wrapper.paths import runs_root
    from wrapper.runs import table_rows

    rows = table_rows(runs_root(), name)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, ensure_ascii=False))
        return
    if not rows:
        click.echo(f"no runs in {runs_root()}" + (f" for {name!r}" if name else "") + ": start one with lfw train RECIPE")
        return
    from rich.console import Console
    from rich.table import Table

    styles = {"succeeded": "green", "failed": "red", "interrupted": "yellow", "running": "cyan",
              "died": "red", "unreadable": "magenta"}
    table = Table(show_edge=False, pad_edge=False)
    for col in ("name", "run", "started", "status", "model", "method", "steps", "final loss", "duration"):
        table.add_column(col, justify="right" if col in ("steps", "final loss", "duration") else "left",
                         no_wrap=col not in ("model",), overflow="fold")
    for row in rows:
        status = row["status"]
        table.add_row(*(row[c] if c != "status" else f"[{styles.get(status, '')}]{status}[/]"
                        for c in ("name", "run", "started", "status", "model", "method", "steps", "final loss",
                                  "duration")))
    Console(width=None if Console().is_terminal else 200).print(table)
