import sys

import click


@click.command(help="Fine-tune RECIPE: download the model, train with a progress bar, keep the run in runs/.\n\n"
                    "Ctrl-C stops the trainer and keeps its checkpoints; --resume RUN_DIR continues from the last one.")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--resume", "resume_dir", metavar="RUN_DIR", type=click.Path(file_okay=False),
              help="continue an interrupted or failed run from its last checkpoint")
@click.option("-v", "--verbose", is_flag=True, help="show LLaMA-Factory's raw log instead of the progress bar")
def command(recipe, resume_dir, verbose):
    from wrapper import train

    argv = ["lfw", *sys.argv[1:]]
    if resume_dir:
        if recipe:
            raise click.UsageError("give either RECIPE or --resume RUN_DIR, not both")
        train.resume(resume_dir, verbose=verbose, argv=argv)
    else:
        if not recipe:
            from wrapper.paths import DEFAULT_RECIPE

            recipe = str(DEFAULT_RECIPE)
        train.train(recipe, verbose=verbose, argv=argv)
