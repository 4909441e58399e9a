import click

from wrapper.errors import LfwError


class DoctorFailed(LfwError):
    exit_code = 1


@click.command(help="Check this machine: GPUs and free memory, CUDA, versions, and whether bf16, 4-bit QLoRA and "
                    "the liger kernel work. One line each; exit 1 when something lfw needs fails.")
def command():
    from wrapper.doctor import run_checks

    checks = run_checks()
    for c in checks:
        click.echo(c.line())
    failed = [c.name for c in checks if c.status == "fail"]
    if failed:
        raise DoctorFailed(f"{len(failed)} check(s) failed: {', '.join(failed)} (each line says what to do)")
