"""`rft api`: OpenAI's fine-tuning API, self-hosted, for the unmodified `openai` SDK.

The entry layer above the library, beside the CLI (`rft_core` knows nothing of it):

- `command`: the `rft api` command; `app`: the FastAPI app (routes under `/v1`, auth, errors).
- routes, following OpenAI's API reference field by field: `files` (uploads streamed to disk by
  `uploads`), `jobs` (fine-tuning jobs, events, checkpoints), `graders` (run/validate through
  `rft_core.graders`), `chat` (models, chat completions plain and streamed).
- `auth` (bearer keys), `errors` (OpenAI's error shape), `pagination` (list envelopes).
- `store`: files, jobs and events in sqlite under the data directory (`settings` says where).
- `catalog`: model names (`rft-tiny`, `ft:...`, checkpoints) and what they point at.
- `hyperparameters`: OpenAI's hyperparameters mapped onto rft's config (the one table);
  `job_data`: a job's files as the pipeline reads them, and their validation.
- `runner`: validation, queue, one worker process per job (`worker`: runs the pipeline flow and
  records the outcome) or a run of rft's Prefect deployment (`deployments`); pause/resume/cancel;
  restarts. `results`: metrics events, checkpoints, results CSV from the tracking store.
- `serving`: fine-tuned models and checkpoints loaded once (LRU) and generated with as evaluation does.
"""
