"""The `rft` command: run the pipeline, validate data, run graders, train a stage, manage models."""

from __future__ import annotations

import typer

from rft.api.command import api_cmd
from rft.grade import grade_cmd
from rft.registry import models_cmd, promote_cmd, rollback_cmd
from rft.run import run_cmd, train_cmd
from rft.serve import serve_cmd
from rft.validate import validate_cmd

app = typer.Typer(
    help="rft: Reinforcement Fine-Tuning of language models (SFT warm-up, PPO/GRPO with graders).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("run", help="Run the whole pipeline (built-in demo without --config).")(run_cmd)
app.command("validate", help="Check a data file: counts, problems by line and field, rejects file.")(
    validate_cmd
)
app.command("grade", help="Run a grader on one sample or on files of items and samples.")(grade_cmd)
app.command("train", help="Run one training stage (sft or rl); works under `accelerate launch`.")(train_cmd)
app.command("promote", help="Move the champion alias to a version (through the gate, or --force).")(
    promote_cmd
)
app.command("rollback", help="Move the champion alias back to the previous champion.")(rollback_cmd)
app.command("models", help="List a registered model's versions, aliases and metrics.")(models_cmd)
app.command("api", help="Serve OpenAI's fine-tuning API (files, jobs, graders, chat) for the openai SDK.")(api_cmd)
app.command("serve", help="Serve the deployments of deployments/prefect.yaml from this process, on their schedules.")(
    serve_cmd
)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
