"""The `rft` command: validate data, run graders, run the pipeline, manage registered models."""

from __future__ import annotations

import typer

from rft_core.data.cli import validate_cmd
from rft_core.graders.cli import grade_cmd

app = typer.Typer(
    help="rft: Reinforcement Fine-Tuning of language models (SFT warm-up, PPO/GRPO with graders).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("validate", help="Check a data file: counts, problems by line and field, rejects file.")(
    validate_cmd
)
app.command("grade", help="Run a grader on one sample or on files of items and samples.")(grade_cmd)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
