"""The `rft` command: run the pipeline, validate data, run graders, train a stage, manage models,
serve the Prefect deployments.

Help is click's plain format (typer's `rich_markup_mode=None`): typer's rich panels show a flag
such as `--fresh` as `--fresh <bool>`, as if it took a value. Each command's `--help` is its
docstring; the one-line summaries of the command list are the `short_help` here.
"""

from __future__ import annotations

import typer

from rft.api.command import api_cmd
from rft.grade import grade_cmd
from rft.registry import models_cmd, promote_cmd, rollback_cmd
from rft.run import run_cmd, train_cmd
from rft.serve import serve_alias_cmd, serve_cmd
from rft.validate import validate_cmd

app = typer.Typer(
    help="rft: Reinforcement Fine-Tuning of language models (SFT warm-up, PPO/GRPO with graders).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

app.command("run", short_help="Run the whole pipeline (the built-in demo without --config).")(run_cmd)
app.command("validate", short_help="Check a data file: problems by line and field, rejects.")(validate_cmd)
app.command("grade", short_help="Run a grader on a sample or on files, or check a spec.")(grade_cmd)
app.command("train", short_help="Run one training stage (sft or rl), e.g. under accelerate.")(train_cmd)
app.command("promote", short_help="Move alias champion to a version (the gate, or --force).")(promote_cmd)
app.command("rollback", short_help="Move alias champion back to the previous champion.")(rollback_cmd)
app.command("models", short_help="A registered model's versions: aliases, status, metrics.")(models_cmd)
app.command("api", short_help="Serve OpenAI's fine-tuning API for the openai SDK.")(api_cmd)

deployments = typer.Typer(
    help="The Prefect deployments of deployments/prefect.yaml: scheduled and triggered flow runs of "
    "the pipeline, the champion's evaluation, promotion and rollback.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
deployments.command("serve", short_help="Run the deployments from this process (not a model server).")(serve_cmd)
app.add_typer(deployments, name="deployments", short_help="Prefect deployments: rft deployments serve.")
app.command("serve", short_help="Alias of rft deployments serve (not a model server).")(serve_alias_cmd)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
