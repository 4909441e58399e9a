import click


@click.command(help="The identity check of RUN (a run directory or recipe name; default: the newest successful run): "
                    "held-out identity questions (English, Chinese) and a retention set, put to the base model and "
                    "the tuned one without a system prompt and with the template's default. Writes eval.json and "
                    "report.md into the run.")
@click.argument("run", required=False)
@click.option("-q", "--questions", type=click.Path(exists=True, dir_okay=False), default=None,
              help="more questions: JSON list / JSON lines ({question, lang, asks_author} or {question, accept: [..]}) "
                   "or text, one identity question per line")
@click.option("--max-new-tokens", type=click.IntRange(1), default=48, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
def command(run, questions, max_new_tokens, batch_size):
    from rich.console import Console

    from wrapper.evaluate import evaluate, rich_table
    from wrapper.report import write_report
    from wrapper.runs import find_run

    run_dir = find_run(run)
    err = Console(stderr=True)
    result = evaluate(run_dir, questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      log=lambda s: err.print(f"[dim]eval[/]  {s}", highlight=False))
    Console().print(rich_table(result))
    report = write_report(run_dir)
    click.echo(f"wrote {run_dir / 'eval.json'} and {report} ({result['timings']['total_s']:.0f}s)")
