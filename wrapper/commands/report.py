import click


@click.command(help="Write RUN's report.md (a run directory or recipe name; default: the newest successful run): "
                    "recipe, loss plots, eval table, timings, versions.")
@click.argument("run", required=False)
def command(run):
    from wrapper.report import write_report
    from wrapper.runs import find_run

    click.echo(write_report(find_run(run)))
