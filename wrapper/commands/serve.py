import sys

import click


@click.command(help="Serve RUN's model (a run directory or recipe name; default: the newest successful run) through "
                    "an OpenAI-compatible API (llamafactory-cli api). Ctrl-C stops it.")
@click.argument("run", required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; one other than loopback needs an API key")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="LFW_API_KEY", default=None, show_envvar=True,
              help="clients must send it as 'Authorization: Bearer KEY' (prefer the environment variable)")
@click.option("--base", is_flag=True, help="serve the base model, without the adapter")
def command(run, host, port, api_key, base):
    from wrapper.runs import find_run
    from wrapper.serve import check_host, serve

    check_host(host, api_key)  # refused before anything else happens
    sys.exit(serve(find_run(run), host=host, port=port, api_key=api_key, base=base, say=click.echo))
