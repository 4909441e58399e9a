import click

from wrapper.prepare import describe, prepare


@click.command(help="Write train.yaml, infer.yaml, export.yaml and data/ for RECIPE (no GPU, no network).")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", default=None, help="output folder (default: rendered/<name>)")
def command(recipe, out_dir):
    from wrapper.recipe import load_recipe

    out_dir = out_dir or f"rendered/{load_recipe(recipe).name}"
    prepared = prepare(recipe, out_dir)
    for line in describe(prepared.plan):
        click.echo(line)
    click.echo(f"wrote     {len(prepared.files)} files to {prepared.plan.out_dir}/")
    for label in prepared.files:
        click.echo(f"          {label}")
