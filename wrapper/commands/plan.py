import click


@click.command(help="Show what RECIPE will do on this machine: model, method, batch, precision, memory.")
@click.argument("recipe", type=click.Path(dir_okay=False))
def command(recipe):
    import tempfile
    from pathlib import Path

    from wrapper.device import Device
    from wrapper.prepare import describe, plan_recipe

    _, plan = plan_recipe(recipe, Path(tempfile.gettempdir()) / "lfw-plan", Device.detect())
    for line in describe(plan):
        click.echo(line)
