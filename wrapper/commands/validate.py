import tempfile

import click

from wrapper.prepare import prepare


@click.command(help="Check RECIPE: schema, data, template, and LLaMA-Factory's own parser on the rendered YAMLs.")
@click.argument("recipe", type=click.Path(dir_okay=False))
def command(recipe):
    from wrapper.device import Device
    from wrapper.lfcheck import check_with_llamafactory

    with tempfile.TemporaryDirectory(prefix="lfw-validate-") as tmp:
        # the files `lfw train` would write on this machine (bf16 is off without a GPU)
        prepared = prepare(recipe, tmp, Device.detect())
        click.echo(f"{recipe}: recipe ok ({prepared.plan.n_samples} samples, template {prepared.plan.template})")
        check_with_llamafactory(prepared.files)
    click.echo(f"{recipe}: LLaMA-Factory accepts train.yaml, infer.yaml and export.yaml")
