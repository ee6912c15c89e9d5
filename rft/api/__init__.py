"""`rft api`: OpenAI's fine-tuning API, self-hosted, for the unmodified `openai` SDK.

The entry layer above the library, beside the CLI: a FastAPI app (`app.py`) whose routes follow
OpenAI's API reference field by field (files, fine-tuning jobs with their events and checkpoints,
graders run/validate, models, chat completions), with its own auth (`auth.py`), errors
(`errors.py`), persistent store (`store.py`: sqlite under the data directory), job runner
(`runner.py`: one worker process per job running the pipeline flow, `worker.py`), the mapping of
OpenAI's hyperparameters onto rft's config (`hyperparameters.py`), and serving (`serving.py`).
`rft_core` knows nothing of it.
"""
