from pathlib import Path

import click


@click.command(help="Merge RUN's adapter into its base model (a run directory or recipe name; default: the newest "
                    "successful run): safetensors, tokenizer, chat template and Ollama Modelfile, "
                    "through llamafactory-cli export.")
@click.argument("run", required=False)
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="output folder (default: <run>/export)")
def command(run, out_dir):
    from wrapper.export import export, ollama_hint
    from wrapper.runs import find_run, read_manifest

    run_dir = find_run(run)
    info = export(run_dir, out_dir, log=lambda s: click.echo(f"export    {s}", err=True))
    click.echo(f"exported  {info['dir']}  ({info['bytes'] / 2**20:.0f} MiB, {info['seconds']:.0f}s)")
    if info["system_prompt"]:
        click.echo(f"system    {info['system_prompt']!r} is the chat template's default")
    name = (read_manifest(run_dir) or {}).get("name") or run_dir.parent.name
    click.echo(f"ollama    {ollama_hint(name, Path(info['dir']))}")
