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
    from rich import box
    from rich.console import Console
    from rich.table import Table

    styles = {"succeeded": "green", "failed": "red", "interrupted": "yellow", "running": "cyan",
              "died": "red", "unreadable": "magenta"}
    cols = ("name", "run", "started", "status", "model", "method", "steps", "final loss", "duration")
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for col in cols:
        # in a narrow terminal the model folds, and two headers go on two lines
        table.add_column(col, justify="right" if col in ("steps", "final loss", "duration") else "left",
                         no_wrap=col not in ("model", "final loss", "duration"), overflow="fold",
                         min_width=8 if col in ("model", "duration") else None)
    for row in rows:
        status = row["status"]
        values = {**row, "status": f"[{styles.get(status, '')}]{status}[/]", "run": row["run"].rsplit("-", 1)[-1]}
        table.add_row(*(values[c] for c in cols))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)
    console.print(f"[dim]each run is in {runs_root()}/<name>/<UTC start>-<run>/ (lfw runs --json gives the paths)[/]")
