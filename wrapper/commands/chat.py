import sys

import click


@click.command(help="Chat with RUN's model (a run directory or recipe name; default: the newest successful run). "
                    "Type `exit` or Ctrl-D to leave, `clear` to forget the conversation.")
@click.argument("run", required=False)
@click.option("-p", "--prompt", default=None, help="answer this once and print only the answer ('-': read it from stdin)")
@click.option("--base", is_flag=True, help="the base model, without the adapter and the identity prompt")
@click.option("--sample", is_flag=True, help="with --prompt: sample (LLaMA-Factory's settings) instead of greedy")
@click.option("--max-new-tokens", type=click.IntRange(1), default=None, help="with --prompt: answer length limit")
def command(run, prompt, base, sample, max_new_tokens):
    from wrapper import chat
    from wrapper.runs import find_run

    run_dir = find_run(run)
    if prompt is None:
        sys.exit(chat.interactive(run_dir, base=base))
    if prompt == "-":
        prompt = sys.stdin.read()
    click.echo(chat.answer(run_dir, prompt, base=base, sample=sample, max_new_tokens=max_new_tokens).strip())
