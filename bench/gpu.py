"""A prepared GPU check: our PPO and GRPO (LoRA and full fine-tuning, bf16 compute) and TRL's GRPOTrainer
on a randomly initialised model of Qwen2.5-0.5B-Instruct's shape, on one CUDA GPU, nothing downloaded.

    python bench/gpu.py --prepare                   # here (network): TRL and what it needs -> bench/.wheels
    python bench/gpu.py --dry-run                   # here: the whole flow on CPU at toy size (smoke test)
    python3 bench/gpu.py --out $OUT/gpu.json        # there (one GPU, no network), bench/.wheels carried

Per run (a process each, one after the other): rollout tokens/s (generated tokens / generation time),
update tokens/s (prompt + response tokens through forward and backward, all epochs / update time),
completed samples/s and seconds per iteration over the iterations after a warm-up one, and the peak
GPU memory of the process (`torch.cuda.max_memory_allocated`, and `max_memory_reserved`). Runs: ours
GRPO and PPO, each with LoRA and full fine-tuning; TRL's GRPO with LoRA and full fine-tuning on the
same model, prompts (in the same order), reward, group size, batch sizes, epochs, completion length,
KL coefficient (both keep a reference), learning rate and gradient checkpointing (off on both by
default); bf16 compute on both, TRL's weights loaded in the dtype our trainer kept the same mode's
weights in (`trl_weights_dtype`). Warm-up SFT is skipped: RL starts from the random model, graded by numeric_match on the
synthetic arithmetic items (rewards ~0: learning is not measured here, speed and memory are). TRL's
PPO (1.12 only) is not run here. Budget: about 5 minutes on an H200 (`--budget-s` skips what would
not fit).

The GPU machine has no network. Its image holds torch (CUDA), numpy, pandas, pyarrow, tokenizers,
safetensors, huggingface_hub and more, but not TRL, datasets or pydantic, and other versions of
transformers/peft than the ones tested here. `--prepare` (run here) makes the TRL environment of the
benchmarks (`bench/trl_envs.py`), reads the versions it runs (TRL, transformers, accelerate, peft,
datasets, ... as tested here), walks their requirements and downloads their wheels into
`bench/.wheels` (git-ignored; carry it): pure-Python wheels, and compiled ones for the target
Python versions (`--python-versions`, default 3.12 = the GPU image's, plus this interpreter's),
except the large compiled libraries the target must have (`TARGET_PROVIDES`: torch, numpy, pandas,
pyarrow, huggingface_hub, sympy, ...). At the start of a run, the script installs, offline and into a
private folder (`bench/.envs/gpu-site-*`, put first on PYTHONPATH), every bundled package the
interpreter lacks, has in another version where the version matters (TRL, transformers, accelerate,
peft, datasets), or has in a version another bundled package's requirements exclude; then it
restarts itself with that folder on the path, checks the imports, and says clearly what is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
WHEELS = BENCH / ".wheels"
SITES = BENCH / ".envs"
MANIFEST = "manifest.json"
BOOT_ENV = "RFT_GPU_BENCH_BOOT"  # set once the bundle is on the path (JSON: what was installed)

# What the benchmark imports (the closure of their requirements is bundled).
ROOTS = ("trl", "transformers", "accelerate", "peft", "datasets", "pydantic", "pandera", "math-verify",
         "pyyaml", "regex", "tokenizers", "safetensors", "psutil", "jinja2")
# Large or compiled libraries the GPU machine must have itself (checked, never bundled).
TARGET_PROVIDES = ("torch", "numpy", "pandas", "pyarrow", "huggingface-hub", "hf-xet", "sympy", "mpmath",
                   "networkx", "triton", "setuptools", "pip")
# Installed from the bundle whenever the interpreter has another version: the code being compared.
PINNED = ("trl", "transformers", "accelerate", "peft", "datasets")
# Wheel platforms the download may pick (pip matches each tag exactly; glibc >= 2.28 there).
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
             *(f"manylinux_2_{n}_x86_64" for n in range(17, 29))]
CARRY_LIMIT_MIB = 64


def canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


# =========================================================================== --prepare (here)

_CLOSURE = r"""
import json, sys
from importlib import metadata
from packaging.markers import default_environment
from packaging.requirements import Requirement
roots, stop, versions = json.loads(sys.argv[1])
def canon(n): return n.lower().replace("_", "-").replace(".", "-")
envs = []
for v in versions:
    e = dict(default_environment()); e.update(python_version=v, python_full_version=v + ".0", extra="")
    e.update(sys_platform="linux", platform_system="Linux", platform_machine="x86_64")
    envs.append(e)
seen, todo = {}, [canon(r) for r in roots]
while todo:
    name = todo.pop()
    if name in seen or name in stop:
        continue
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        seen[name] = None
        continue
    requires = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate(e) for e in envs):
            continue
        requires.append(text)
        todo.append(canon(req.name))
    pure = "Root-Is-Purelib: true" in (dist.read_text("WHEEL") or "")
    seen[name] = {"version": dist.version, "pure": pure, "requires": requires}
print(json.dumps(seen))
"""


def prepare(args: argparse.Namespace) -> None:
    """Download the wheels the GPU machine needs into `--wheels-dir`, with a manifest."""
    from trl_envs import TRL_GRPO, ensure_env

    python = ensure_env(args.trl_version)
    versions = sorted({*args.python_versions.split(","), f"{sys.version_info.major}.{sys.version_info.minor}"})
    out = subprocess.run(
        [str(python), "-c", _CLOSURE, json.dumps([list(ROOTS), list(TARGET_PROVIDES), versions])],
        check=True, capture_output=True, text=True,
    )
    closure = json.loads(out.stdout)
    missing = sorted(n for n, d in closure.items() if d is None)
    if missing:
        print(f"[prepare] not installed in {python}, left out: {', '.join(missing)}")
    dists = {n: d for n, d in closure.items() if d is not None}
    wheels = Path(args.wheels_dir)
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    pins = [f"{n}=={d['version']}" for n, d in sorted(dists.items())]
    for version in versions:
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--implementation", "cp", "--python-version", version,
               *(f"--platform={p}" for p in PLATFORMS), "-d", str(wheels), *pins]
        print(f"[prepare] pip download for Python {version}: {len(pins)} packages ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"pip download failed for Python {version}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    files: dict[str, list[str]] = {}
    for f in sorted(wheels.glob("*.whl")):
        files.setdefault(canon(f.name.split("-")[0]), []).append(f.name)
    for name, d in dists.items():
        d["files"] = files.get(name, [])
        if not d["files"]:
            raise SystemExit(f"no wheel downloaded for {name}=={d['version']}")
    size = sum(f.stat().st_size for f in wheels.glob("*.whl"))
    manifest = {
        "made": time.strftime("%Y-%m-%d %H:%M:%S"),
        "trl": dists["trl"]["version"],
        "trl_default": TRL_GRPO,
        "python_versions": versions,
        "dists": dists,
        "target_provides": list(TARGET_PROVIDES),
        "size_bytes": size,
    }
    (wheels / MANIFEST).write_text(json.dumps(manifest, indent=1))
    print(f"[prepare] {wheels}: {sum(len(v) for v in files.values())} wheels, {size / 2**20:.1f} MiB")
    for name, d in sorted(dists.items()):
        print(f"  {name} {d['version']} ({'pure' if d['pure'] else 'compiled'}): {', '.join(d['files'])}")
    if size > (CARRY_LIMIT_MIB - 8) * 2**20:
        print(f"[prepare] WARNING: {size / 2**20:.0f} MiB is close to the device tool's {CARRY_LIMIT_MIB} MiB carry limit")
    rel = os.path.relpath(wheels, REPO)
    print(f"[prepare] done. On the GPU machine: carry {rel!r} and run `python3 bench/gpu.py --out $OUT/gpu.json`")


# =========================================================================== the bundle (there)


def _packaging():
    try:
        from packaging import tags, utils, version
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging import tags, utils, version  # type: ignore[no-redef]
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    return tags, utils, version, Requirement


def plan_bundle(manifest: dict[str, Any]) -> tuple[dict[str, str], list[str], list[str]]:
    """Which bundled wheels this interpreter needs: (dist -> wheel file, fatal problems, warnings).

    A bundled package is installed when the interpreter lacks it, has it in another version and it
    is in PINNED, or has a version that a bundled package's requirements exclude.
    """
    from importlib import metadata

    tags, utils, version, Requirement = _packaging()
    here: dict[str, str] = {}
    for dist in metadata.distributions():  # in path order: the first of a name is the one imported
        if dist.metadata["Name"]:
            here.setdefault(canon(dist.metadata["Name"]), dist.version)
    bundled = manifest["dists"]
    supported = set(tags.sys_tags())
    chosen: dict[str, str] = {}
    for name, d in bundled.items():
        if name not in here or (name in PINNED and here[name] != d["version"]):
            chosen[name] = d["version"]
    problems: list[str] = []
    warnings: list[str] = []
    changed = True
    while changed:  # a package chosen for one requirement may bring requirements of its own
        changed, problems, warnings = False, [], []
        effective = {**here, **chosen}
        # Bundled packages that will be on the path in their bundled version: their requirements hold.
        active = [n for n, d in bundled.items() if effective.get(n) == d["version"]]
        for name in active:
            for text in bundled[name]["requires"]:
                req = Requirement(text)
                if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                    continue
                dep = canon(req.name)
                have = effective.get(dep)
                if have is not None and req.specifier.contains(version.Version(have), prereleases=True):
                    continue
                offer = bundled.get(dep)
                if offer and dep not in chosen and req.specifier.contains(offer["version"], prereleases=True):
                    chosen[dep] = offer["version"]
                    changed = True
                    continue
                line = f"{name} {bundled[name]['version']} needs {text}: " + (
                    f"this interpreter has {have}" if have else "not installed")
                (warnings if have is not None else problems).append(line)
    files: dict[str, str] = {}
    for name in sorted(chosen):
        fits = [f for f in bundled[name]["files"] if supported & set(utils.parse_wheel_filename(f)[3])]
        if not fits:
            problems.append(
                f"no wheel of {name} {bundled[name]['version']} for this Python "
                f"({platform.python_version()}): run `python bench/gpu.py --prepare --python-versions "
                f"{sys.version_info.major}.{sys.version_info.minor}` where there is network"
            )
            continue
        files[name] = fits[0]
    return files, problems, warnings


def install_bundle(wheels: Path, files: dict[str, str]) -> Path:
    """Install the chosen wheels (offline, no dependency resolution) into a private folder."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    digest = hashlib.sha256(json.dumps(sorted(files.values())).encode()).hexdigest()[:10]
    site_dir = SITES / f"gpu-site-{tag}-{digest}"
    if (site_dir / ".complete").exists():
        return site_dir
    staging = site_dir.with_name(site_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if files:
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--quiet", "--target", str(staging),
               *(str(wheels / f) for f in files.values())]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"installing the bundled wheels failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    else:
        staging.mkdir(parents=True)
    (staging / ".complete").write_text(json.dumps(files, indent=1))
    shutil.rmtree(site_dir, ignore_errors=True)
    staging.rename(site_dir)
    return site_dir


def bootstrap(args: argparse.Namespace) -> None:
    """Put the bundle on the path and restart this script (once); then return."""
    if os.environ.get(BOOT_ENV):
        return
    wheels = Path(args.wheels_dir)
    info: dict[str, Any] = {"bundle": None, "installed": {}, "warnings": []}
    env = dict(os.environ)
    paths = [str(REPO)]
    if (wheels / MANIFEST).exists():
        manifest = json.loads((wheels / MANIFEST).read_text())
        files, problems, warnings = plan_bundle(manifest)
        if problems:
            raise SystemExit("bench/gpu.py cannot run here:\n  " + "\n  ".join(problems))
        site_dir = install_bundle(wheels, files)
        paths.insert(0, str(site_dir))
        info.update(bundle=str(wheels), site=str(site_dir), installed=files, warnings=warnings,
                    bundle_trl=manifest["trl"], bundle_made=manifest["made"])
        for w in warnings:
            print(f"[gpu] warning: {w}", flush=True)
        print(f"[gpu] bundle: {len(files)} packages installed into {site_dir}" if files else
              "[gpu] bundle: nothing to install (every package present in its version)", flush=True)
    else:
        print(f"[gpu] no wheel bundle at {wheels}: using what this interpreter has "
              "(`python bench/gpu.py --prepare` makes one)", flush=True)
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env[BOOT_ENV] = json.dumps(info)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def check_imports(need_trl: bool) -> dict[str, str]:
    """Import what the runs need; exit with one message listing every failure."""
    import importlib

    modules = ["torch", "transformers", "accelerate", "peft", "tokenizers", "safetensors", "pydantic", "pandera",
               "pandas", "yaml", "rft_core.rl.trainer", "rft_core.data", "rft_core.graders"]
    if need_trl:
        modules += ["datasets", "trl"]
    failed, versions = [], {}
    for name in modules:
        try:
            module = importlib.import_module(name)
            if "." not in name:
                versions[name] = getattr(module, "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - reported with the module's name
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    if failed:
        hint = ("TRL or its needs are missing: run `python bench/gpu.py --prepare` where there is network and carry "
                "bench/.wheels, or pass --no-trl" if any(f.startswith(("trl", "datasets")) for f in failed) else
                "install these in this interpreter (compiled libraries are not bundled: see TARGET_PROVIDES)")
        raise SystemExit("bench/gpu.py: imports failed:\n  " + "\n  ".join(failed) + f"\n{hint}")
    return versions


def require_cuda() -> str:
    try:
        import torch
    except ImportError as exc:
        raise SystemExit(f"bench/gpu.py needs torch with CUDA ({exc}); install the machine's torch build first") from None
    if not torch.cuda.is_available():
        raise SystemExit(
            f"bench/gpu.py: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}). It measures "
            "GPU speed and memory; on a machine without a GPU run the CPU smoke test: python bench/gpu.py --dry-run"
        )
    return torch.cuda.get_device_name(0)


# =========================================================================== the runs

# Settings per scale: the GPU check, and the toy CPU smoke run (same flow, minutes -> seconds).
SCALES: dict[str, dict[str, Any]] = {
    "full": {"prompts": 16, "samples": 8, "minibatch": 64, "epochs": 2, "max_new_tokens": 128, "iterations": 3,
             "n_train": 512},
    "tiny": {"prompts": 4, "samples": 4, "minibatch": 8, "epochs": 2, "max_new_tokens": 16, "iterations": 2,
             "n_train": 64},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from trl_envs import TRL_GRPO

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true", help="download the wheel bundle for the GPU machine (needs network)")
    ap.add_argument("--python-versions", default="3.12", help="--prepare: target Pythons for compiled wheels (+ this one)")
    ap.add_argument("--trl-version", default=TRL_GRPO, help="--prepare: TRL release to bundle")
    ap.add_argument("--wheels-dir", default=str(WHEELS), help="the wheel bundle (default bench/.wheels)")
    ap.add_argument("--dry-run", action="store_true", help="= --device cpu --tiny: the whole flow at toy size on CPU")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the same architecture at toy size (hidden 64, 2 layers)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--algorithms", default="grpo,ppo", help="ours: grpo, ppo (TRL: grpo only)")
    ap.add_argument("--modes", default="lora,full", help="lora (r 16, alpha 32, all linear layers), full")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL's runs")
    for key in ("prompts", "samples", "minibatch", "epochs", "max_new_tokens", "iterations", "n_train"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default: {SCALES['full'][key]} (tiny {SCALES['tiny'][key]})")
    ap.add_argument("--warmup", type=int, default=1, help="iterations left out of the measurement")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--kl-coef", type=float, default=0.05, help="our kl_coef = TRL beta (both keep a reference)")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on for both sides (default off for both)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads per run (default: torch's; --dry-run: 1)")
    ap.add_argument("--budget-s", type=float, default=285.0, help="skip runs that would end after this many seconds")
    ap.add_argument("--run-timeout", type=int, default=240, help="seconds before one run is abandoned")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep the model, specs and logs here (default: a temporary directory)")
    ap.add_argument("--out", default=str(BENCH / "results" / "gpu.json"), help="JSON result path")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
        args.threads = args.threads or 1
    scale = SCALES["tiny" if args.tiny else "full"]
    for key, value in scale.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def cases(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(side, algorithm, mode) in the order they run: each TRL run right after ours of the same kind."""
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    out = []
    for algorithm in algorithms:
        for mode in modes:
            out.append(("ours", algorithm, mode))
            if algorithm == "grpo" and not args.no_trl:
                out.append(("trl", algorithm, mode))
    return out


def trl_weights_dtype(rows: list[dict], algorithm: str, mode: str, compute: str) -> str:
    """The dtype TRL loads the model in: the one our trainer kept the same mode's weights in (its
    run comes first), so both train the same recipe (bf16 autocast over float32 weights, or bf16
    weights; LoRA: the frozen base). Without our run: float32 for full fine-tuning, else `compute`."""
    for r in rows:
        if (r["side"], r["algorithm"], r["mode"]) == ("ours", algorithm, mode) and "model_dtype" in r:
            return r["model_dtype"].removeprefix("torch.")
    return "float32" if mode == "full" else compute


def run_one(spec: dict, workdir: Path, tag: str, env: dict, timeout: int) -> dict:
    spec_path, out_path, log_path = (workdir / f"{tag}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec, indent=1))
    started = time.perf_counter()
    with log_path.open("w") as log:
        try:
            proc = subprocess.run([sys.executable, str(BENCH / "_gpu_worker.py"), str(spec_path), str(out_path)],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            failed = proc.returncode != 0 or not out_path.exists()
        except subprocess.TimeoutExpired:
            failed = True
    wall = time.perf_counter() - started
    if failed:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        return {"error": f"failed after {wall:.0f}s (log {log_path}):\n{tail}", "process_s": wall}
    result = json.loads(out_path.read_text())
    result["process_s"] = wall
    return result


def print_table(rows: list[dict], device: str) -> None:
    mem = "peak GiB" if device == "cuda" else "peak RSS MB"
    headers = ["side", "algo", "mode", "weights", "rollout tok/s", "update tok/s", "samples/s", "s/iter", mem,
               "reserved GiB", "process s"]
    lines = []
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append([r["side"], r["algorithm"], r["mode"], r.get("skipped", "FAILED"), "", "", "", "", "", "", ""])
            continue
        peak = f"{r['peak_allocated_gib']:.2f}" if device == "cuda" else f"{r['peak_rss_mb']:.0f}"
        reserved = f"{r['peak_reserved_gib']:.2f}" if device == "cuda" else ""
        short = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}
        weights = short.get(r["trainable_dtype"], r["trainable_dtype"])
        if r["mode"] == "lora":  # trained adapters over a frozen base
            weights += f" on {short.get(r['model_dtype'], r['model_dtype'])}"
        lines.append([r["side"] + (f" {r['trl_version']}" if r["side"] == "trl" else ""), r["algorithm"], r["mode"],
                      weights, f"{r['rollout_tokens_per_s']:.0f}", f"{r['update_tokens_per_s']:.0f}", f"{r['samples_per_s']:.2f}",
                      f"{r['seconds_per_iteration']:.2f}", peak, reserved, f"{r['process_s']:.0f}"])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))


def compare(rows: list[dict]) -> list[dict]:
    """Ours / TRL for each GRPO mode both sides finished."""
    out = []
    done = {(r["side"], r["algorithm"], r["mode"]): r for r in rows if "error" not in r and "skipped" not in r}
    for (side, algorithm, mode), trl in done.items():
        ours = done.get(("ours", algorithm, mode))
        if side != "trl" or ours is None:
            continue
        item = {"algorithm": algorithm, "mode": mode, "same_prompts": trl.get("same_prompts")}
        for key in ("samples_per_s", "rollout_tokens_per_s", "update_tokens_per_s"):
            item[f"{key}_ratio"] = ours[key] / trl[key]
        for key in ("peak_allocated_gib", "peak_rss_mb"):
            if key in ours and key in trl:
                item[f"{key}_ratio"] = ours[key] / trl[key]
        out.append(item)
    return out


def main(argv: list[str] | None = None) -> dict | None:
    sys.path.insert(0, str(BENCH))
    args = parse_args(argv)
    if args.prepare:
        prepare(args)
        return None
    began = time.perf_counter()
    device_name = require_cuda() if args.device == "cuda" else platform.processor() or "cpu"
    bootstrap(args)  # returns only once the bundle is on the path (restarts the script otherwise)
    boot = json.loads(os.environ.get(BOOT_ENV, "{}"))
    versions = check_imports(need_trl=not args.no_trl)

    from _gpu_fixture import build_model_dir
    from vs_trl import ordered_prompts

    from rft_core.config import DEFAULT_GRADER, RFTConfig, SyntheticConfig
    from rft_core.data import load_items
    from rft_core.data.synthetic import write_synthetic
    from rft_core.models import load_tokenizer, render_prompt

    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="rft-gpu-bench-")
        workdir = Path(tmp.name)
    train_file, _ = write_synthetic(SyntheticConfig(n_train=args.n_train, n_val=8, max_steps=3, seed=args.seed), workdir / "data")
    frame = load_items(train_file).frame
    texts = list(frame["prompt"]) + [s for s in frame["solution"] if isinstance(s, str)]
    t0 = time.perf_counter()
    fixture = build_model_dir(workdir / "model", texts, tiny=args.tiny, seed=args.seed, device=args.device)
    fixture["build_s"] = time.perf_counter() - t0
    print(f"[gpu {time.perf_counter() - began:5.0f}s] model: Qwen2 {fixture['params'] / 1e6:.1f}M parameters "
          f"({'tiny' if args.tiny else 'Qwen2.5-0.5B shape'}), tokenizer {fixture['tokenizer_tokens']} tokens, "
          f"built in {fixture['build_s']:.0f}s on {device_name}", flush=True)
    cfg = RFTConfig()
    tokenizer = load_tokenizer(fixture["dir"], cfg.model)
    prompts = [{"prompt": render_prompt(tokenizer, cfg.model, p), "reference": str(r)}
               for p, r in zip(frame["prompt"], frame["reference"], strict=True)]
    prompts_file = workdir / "prompts-trl.jsonl"
    ordered = ordered_prompts(prompts, args.iterations, args.prompts, args.seed)
    prompts_file.write_text("".join(json.dumps(p) + "\n" for p in ordered))

    env = dict(os.environ)
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
    if args.threads:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[key] = str(args.threads)
    settings = {k: getattr(args, k) for k in ("device", "tiny", "dtype", "prompts", "samples", "minibatch", "epochs",
                                              "max_new_tokens", "iterations", "warmup", "temperature", "kl_coef", "lr",
                                              "gradient_checkpointing", "threads", "n_train", "seed")}
    rows: list[dict] = []
    longest = 0.0
    for side, algorithm, mode in cases(args):
        tag = f"{side}-{algorithm}-{mode}"
        elapsed = time.perf_counter() - began
        if elapsed + longest > args.budget_s:
            print(f"[gpu {elapsed:5.0f}s] {tag}: skipped (would end after --budget-s {args.budget_s:.0f})", flush=True)
            rows.append({"side": side, "algorithm": algorithm, "mode": mode, "skipped": "budget"})
            continue
        print(f"[gpu {elapsed:5.0f}s] {tag} ...", flush=True)
        spec = {**settings, "side": side, "algorithm": algorithm, "mode": mode, "model_dir": fixture["dir"],
                "train_file": str(train_file), "prompts_file": str(prompts_file), "grader": dict(DEFAULT_GRADER),
                "trl_weights_dtype": trl_weights_dtype(rows, algorithm, mode, args.dtype)}
        result = run_one(spec, workdir, tag, env, args.run_timeout)
        result.update(side=side, algorithm=algorithm, mode=mode)
        if side == "trl" and "error" not in result:  # TRL generated for the prompts ours drew, in that order
            seen = result.pop("prompts_seen", [])
            result["same_prompts"] = bool(seen) and seen == [p["prompt"] for p in ordered[: len(seen)]]
        longest = max(longest, result["process_s"])
        rows.append(result)
        if "error" in result:
            print(f"         FAILED: {result['error']}", flush=True)
        else:
            mem = (f"peak {result['peak_allocated_gib']:.2f} GiB" if args.device == "cuda"
                   else f"peak RSS {result['peak_rss_mb']:.0f} MB")
            print(f"         rollout {result['rollout_tokens_per_s']:.0f} tok/s, update "
                  f"{result['update_tokens_per_s']:.0f} tok/s, {result['samples_per_s']:.2f} samples/s, {mem}, "
                  f"process {result['process_s']:.0f}s", flush=True)

    import torch
    import transformers

    report = {
        "benchmark": "gpu",
        "device": device_name,
        "rows": [{k: v for k, v in r.items() if k != "iterations"} for r in rows],
        "ours_vs_trl": compare(rows),
        "settings": settings,
        "model": fixture,
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "versions": versions, "bundle": boot,
        },
        "measurement": "rollout tokens/s = generated tokens / generation time; update tokens/s = prompt + response "
        "tokens through forward and backward, all epochs / update time (ours: the update loop; TRL: the iteration "
        "minus its rollout = generation, rewards, old and reference log-probs); samples/s = completions per "
        "iteration x measured iterations / their wall time (device synchronised); after --warmup iterations. Peak "
        "GiB = torch.cuda.max_memory_allocated of the run's process (models, optimizer, activations).",
        "iterations": {f"{r['side']}-{r['algorithm']}-{r['mode']}": r.get("iterations") for r in rows},
        "total_s": time.perf_counter() - began,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_table(rows, args.device)
    for c in report["ours_vs_trl"]:
        mem = c.get("peak_allocated_gib_ratio", c.get("peak_rss_mb_ratio"))
        print(f"ours / TRL, {c['algorithm']} {c['mode']}: samples/s x{c['samples_per_s_ratio']:.2f}, rollout tok/s "
              f"x{c['rollout_tokens_per_s_ratio']:.2f}, update tok/s x{c['update_tokens_per_s_ratio']:.2f}, "
              f"peak memory x{mem:.2f}" + ("" if c["same_prompts"] else " (TRL saw OTHER prompts)"))
    print(f"wrote {out} ({report['total_s']:.0f}s)")
    if tmp is not None:
        tmp.cleanup()
    failed = [r for r in rows if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed")
    return report


if __name__ == "__main__":
    main()
