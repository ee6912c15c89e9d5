"""Models in MLflow: log a `save_pretrained` directory as a pyfunc model, fetch it, load it back.

The logged model's artifacts are the `save_pretrained` directories themselves (a full model +
tokenizer, or a LoRA adapter + its base model), and `load_logged_model` rebuilds them with
transformers/peft from those files, so a reloaded model is bit-identical to the one logged.
(`rft_core.models.load_model` is the other loader: a hub id or local directory, with the config's
LoRA and dtype settings.)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd  # already imported by mlflow; needed at runtime for a type hint MLflow evaluates
from mlflow.exceptions import MlflowException

from rft_core.tracking.errors import RegistryError, TrackingError
from rft_core.tracking.uri import configure, mlflow_client

# Keys of the MLmodel file's metadata: how `load_logged_model` rebuilds the model.
_FORMAT_FULL = "full"
_FORMAT_ADAPTER = "lora_adapter"
_META_FORMAT = "rft_format"
_META_BASE = "rft_base_model"


class _TextGenerator(mlflow.pyfunc.PythonModel):
    """The pyfunc face of a logged model (`mlflow.pyfunc.load_model`, `mlflow models serve`):
    prompts in, greedy completions out. The class is pickled by reference, so loading a model this
    way needs rft installed; `load_logged_model` reads the saved files and unpickles nothing."""

    def __init__(self, fmt: str, base_model: str | None) -> None:
        self.fmt = fmt
        self.base_model = base_model

    def load_context(self, context: Any) -> None:
        base = context.artifacts.get("base_model", self.base_model)
        self.model, self.tokenizer = _load_pretrained(context.artifacts["model"], self.fmt, base)

    # The input is hinted as a DataFrame because MLflow infers no signature from that hint: one
    # inferred from `list[str]` would have no params schema and drop `max_new_tokens`, which
    # `_signature()` declares. (Without any hint MLflow warns at class definition.)
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        import torch

        prompts = model_input.iloc[:, 0].tolist() if hasattr(model_input, "iloc") else list(model_input)
        max_new_tokens = int((params or {}).get("max_new_tokens", 64))
        limit = getattr(self.model.config, "max_position_embeddings", None)
        outputs = []
        for prompt in prompts:
            ids = self.tokenizer(str(prompt), return_tensors="pt")
            length = ids["input_ids"].shape[1]
            # A tiny model's context is short; generating past it gives garbage or an error.
            budget = max_new_tokens if limit is None else max(0, min(max_new_tokens, limit - length))
            with torch.no_grad():
                out = self.model.generate(**ids, max_new_tokens=budget, do_sample=False)
            outputs.append(self.tokenizer.decode(out[0, length:], skip_special_tokens=True))
        return outputs


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64)]),
    )


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists()


def _load_pretrained(model_path: str | Path, fmt: str, base_model: str | Path | None) -> tuple[Any, Any]:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Weights come back in the dtype they were saved in (transformers 5 does this by default;
    # 4.x would upcast a bfloat16 checkpoint to float32 and change the logits).
    dtype = {} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": "auto"}
    model_path = Path(model_path)
    if fmt == _FORMAT_ADAPTER:
        from peft import PeftModel

        if base_model is None:
            raise TrackingError(f"{model_path}: a LoRA adapter was logged without its base model")
        base = AutoModelForCausalLM.from_pretrained(str(base_model), **dtype)
        model = PeftModel.from_pretrained(base, str(model_path))
        tokenizer_source = model_path if _has_tokenizer(model_path) else str(base_model)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), **dtype)
        tokenizer_source = model_path
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(tokenizer_source))


def _pip_requirements(adapter: bool) -> list[str]:
    # Given explicitly: MLflow's inference would import-trace the model and, for transformers,
    # add torchvision. torch gets a floor, not a pin, so a CUDA or CPU build both satisfy it.
    from importlib.metadata import version

    def base(pkg: str) -> str:
        return version(pkg).split("+", 1)[0]

    reqs = [
        f"mlflow=={base('mlflow')}",
        f"torch>={base('torch')}",
        f"transformers=={base('transformers')}",
        f"tokenizers=={base('tokenizers')}",
    ]
    if adapter:
        reqs.append(f"peft=={base('peft')}")
    return reqs


def log_model(
    run_id: str,
    model_dir: str | Path,
    *,
    base_model: str | None = None,
    name: str = "model",
    tracking_uri: str | None = None,
) -> str:
    """Log a `save_pretrained` directory as a model of the run; return its `models:/<id>` URI.

    `model_dir` is a full model with its tokenizer, or a LoRA adapter (it has adapter_config.json).
    An adapter needs `base_model`: a local directory (copied into the logged model, so the model
    reloads even when that directory is gone) or a hub id (recorded; reloading fetches it). The
    adapter's own `base_model_name_or_path` is never trusted: loading an adapter on the wrong base
    silently gives another model. The model also loads as `runs:/<run_id>/<name>`.
    """
    from mlflow.models import Model

    model_dir = Path(model_dir)
    adapter = (model_dir / "adapter_config.json").is_file()
    if not adapter and not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}: no config.json or adapter_config.json; expected a save_pretrained directory"
        )
    if adapter and base_model is None:
        raise ValueError(f"{model_dir} is a LoRA adapter: give base_model (a local directory or hub id)")
    if not adapter and base_model is not None:
        raise ValueError(f"{model_dir} is a full model: base_model is only for LoRA adapters")
    if not adapter and not _has_tokenizer(model_dir):
        raise ValueError(f"{model_dir}: no tokenizer files; save the tokenizer into the model directory")

    client = mlflow_client(tracking_uri)
    fmt = _FORMAT_ADAPTER if adapter else _FORMAT_FULL
    artifacts = {"model": str(model_dir.resolve())}
    metadata = {_META_FORMAT: fmt}
    if base_model is not None:
        metadata[_META_BASE] = base_model
        if Path(base_model).is_dir():
            artifacts["base_model"] = str(Path(base_model).resolve())
    experiment_id = client.get_run(run_id).info.experiment_id
    # Created here so that it belongs to the run's experiment: Model.log would otherwise put it in
    # the fluent "current" experiment (Default, artifacts under ./mlruns of the cwd).
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
    with warnings.catch_warnings():
        # No input example on purpose: MLflow would run generation with it while logging.
        warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
        info = Model.log(
            artifact_path=None,
            name=name,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            python_model=_TextGenerator(fmt, None if "base_model" in artifacts else base_model),
            artifacts=artifacts,
            pip_requirements=_pip_requirements(adapter),
            signature=_signature(),
            metadata=metadata,
        )
    return info.model_uri


def download_model(
    model_uri: str, dst_path: str | Path | None = None, *, tracking_uri: str | None = None
) -> Path:
    """A local directory holding the logged model (runs:/, models:/<id>, models:/NAME/V, models:/NAME@ALIAS).

    Without `dst_path`, a model in a local store may be returned in place: treat it as read-only.
    """
    configure(tracking_uri)
    if dst_path is not None:
        Path(dst_path).mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri, dst_path=None if dst_path is None else str(dst_path)
        )
    except MlflowException as exc:
        raise RegistryError(f"cannot fetch model {model_uri}: {exc.message}") from None
    return Path(local)


def load_logged_model(model_uri: str, *, tracking_uri: str | None = None) -> tuple[Any, Any]:
    """`(model, tokenizer)` of a model logged by `log_model`, in eval mode, exactly as it was saved.

    A LoRA adapter comes back as a `PeftModel` on its recorded base model.
    """
    from mlflow.models import Model

    local = download_model(model_uri, tracking_uri=tracking_uri)
    spec = Model.load(str(local / "MLmodel"))
    fmt = (spec.metadata or {}).get(_META_FORMAT)
    if fmt not in (_FORMAT_FULL, _FORMAT_ADAPTER):
        raise TrackingError(f"{model_uri} was not logged by rft_core.tracking.log_model")
    saved = spec.flavors["python_function"]["artifacts"]
    base: str | Path | None = None
    if "base_model" in saved:
        base = local / saved["base_model"]["path"]
    elif fmt == _FORMAT_ADAPTER:
        base = spec.metadata.get(_META_BASE)
    return _load_pretrained(local / saved["model"]["path"], fmt, base)
