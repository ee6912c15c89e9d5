"""Every MLflow name rft writes besides metric keys: run tags, model version tags, registered-model
tags, aliases. Users filter and script on these names (`tags.rft.stage = 'rl'`, `@champion`), so
they are spelled here once and nowhere else."""

from __future__ import annotations

# Aliases of registered model versions.
ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"

# Run tags.
TAG_KIND = "rft.kind"  # what the run is: KIND_PIPELINE, KIND_REGRESSION
TAG_STAGE = "rft.stage"  # a stage run's stage: validate, split, sft, rl, evaluate
TAG_ATTEMPTS = "rft.attempts"  # how often a stage run was opened (retries count up)
TAG_REUSED_PREFIX = "rft.reused."  # + stage: on a pipeline run, the cached stage run it reused
TAG_RERUN_OF = "rft.rerun_of"  # on a pipeline run: the pipeline runs whose stages it reused (comma-separated)
TAG_NOTE = "mlflow.note.content"  # MLflow's own: the run's description, shown on its page
TAG_RUN_NAME = "mlflow.runName"  # MLflow's own: the run's name
TAG_STARTED_AS = "rft.run_name"  # on a pipeline run: the name it started with (a rerun's name gets a suffix)
TAG_FLOW_RUN = "prefect.flow_run_id"  # the orchestrator's flow run a pipeline run belongs to
TAG_MODEL_URI = "rft.model_uri"  # the model a regression evaluation scored
TAG_REGISTERED_VERSION = "registry.version"  # on a pipeline run: the version it registered
TAG_REGRESSION_VERDICT = "regression.verdict"
TAG_REGRESSION_THRESHOLD = "regression.threshold"
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own: the UI nests child runs under it
TAG_GIT_COMMIT_RUN = "mlflow.source.git.commit"  # the key MLflow's UI shows as the source version
TAG_GRADER_SANDBOX = "rft.grader.sandbox"  # on a pipeline run: how python graders were isolated
# The process that keeps a run open (pipeline and stage runs): a later run ends the run KILLED
# when that process is gone (killed without closing it).
TAG_OWNER_HOST = "rft.owner.host"
TAG_OWNER_PID = "rft.owner.pid"
TAG_OWNER_STARTED = "rft.owner.started"  # the owner's start time: a reused pid is another process
TAG_ENDED_BECAUSE = "rft.ended_because"  # on a run ended KILLED or FAILED: why (stopped, owner gone, the error)
TAG_REPLACED_BY = "rft.replaced_by"  # on a run its owner abandoned: the pipeline run that ended it
TAG_REPLACES = "rft.replaces"  # on a pipeline run: the abandoned pipeline runs it ended (comma-separated)
TAG_GUARD = "rft.guard"  # on the rl run and its pipeline run: what the RL guard did, a line per event
# On a training stage run that ran on Ray (rft_core.launch): where each rank ran (JSON: rank -> host,
# address, node, pid) and on how many machines.
TAG_COMPUTE_RANKS = "rft.compute.ranks"
TAG_COMPUTE_MACHINES = "rft.compute.machines"

KIND_PIPELINE = "pipeline"
KIND_REGRESSION = "regression-evaluation"

# Tags shared by runs and model versions.
TAG_CONFIG_DIGEST = "config_digest"
TAG_DATA_DIGEST = "data_digest"

# Model version tags.
TAG_GIT_COMMIT = "git_commit"
METRIC_TAG_PREFIX = "metric."  # + metric key: the validation metrics the gate reads
GATE_DECISION = "gate.decision"  # also on the pipeline run
GATE_REASON = "gate.reason"  # also on the pipeline run
GATE_METRIC = "gate.metric"
GATE_CHAMPION_VERSION = "gate.champion_version"
GATE_CHAMPION_VALUE = "gate.champion_value"
GATE_TIME = "gate.time"
GATE_RULE = "gate.rule"  # the gate rule that decided (tracking.gate: RULE_*)
GATE_HISTORY = "gate.history"  # every decision on the version, oldest first (JSON list): the audit trail
GATE_HISTORY_LIMIT = 100
START_METRIC_TAG_PREFIX = "start_metric."  # + metric key: the value for the model training started from
TAG_WEIGHTS_FINITE = "weights_finite"  # "true" / "false": every registered weight is a finite number
ROLLED_BACK = "rollback.demoted_at"
# gate.decision values besides the gate's own (promoted, refused): what a rollback records, on the
# version it demotes and on the one it makes champion again (rule RULE_ROLLBACK).
DECISION_PROMOTED = "promoted"
DECISION_REFUSED = "refused"
DECISION_ROLLED_BACK = "rolled back"
DECISION_RESTORED = "restored"
RULE_ROLLBACK = "rollback"

# Registered model tags.
HISTORY_TAG = "rft.champion_history"  # past champions, oldest first, for rollback
HISTORY_LIMIT = 100

# The promotion lock: a registered model named <name> + LOCK_SUFFIX, with these tags.
LOCK_SUFFIX = ".rft-lock"
LOCK_OWNER = "rft.lock.owner"
LOCK_EXPIRES = "rft.lock.expires"

# Dataset input tag: a digest longer than MLflow's 36 characters, kept whole.
INPUT_FULL_DIGEST = "rft.digest"
