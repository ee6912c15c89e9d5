"""The TRL environments of the benchmarks that compare against TRL, made on first use inside the repository.

    python bench/trl_envs.py                   # make both (if missing) and print their interpreters
    python bench/trl_envs.py --versions 1.16.0 # one of them

TRL is not a dependency of the project. Each TRL release the benchmarks use gets its own virtual
environment under `bench/.envs/` (git-ignored), named by its version:

- `bench/.envs/trl-1.16.0`: GRPO (`trl.GRPOTrainer`), the current release when pinned (`TRL_GRPO`);
- `bench/.envs/trl-1.12.0`: PPO (`trl.experimental.ppo`), the last release that has it (`TRL_PPO`).

How an environment is made: `python -m venv` with THIS interpreter, then a `.pth` file that appends
this interpreter's site-packages to the environment's path, then `pip install trl==VERSION` in it.
So torch, transformers, accelerate and the rest are the very installs this interpreter uses (both
sides of a comparison run the same torch build and the same model code, and no second torch is
downloaded: on Linux a bare `pip install torch` pulls a multi-GB CUDA build), and pip installs into
the environment only what TRL needs beyond them (datasets and its own needs). A package TRL wants
in another version than this interpreter has is installed into the environment, where it shadows
the shared one (pip never touches the shared one: it lies outside the environment).

The environment records what it was made from (`rft-env.json`); when this interpreter's torch or
site-packages change (a rebuilt `.venv`), it is made again on next use.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ENVS = BENCH / ".envs"
TRL_GRPO = "1.16.0"  # GRPOTrainer: the current release when the benchmarks were last run
TRL_PPO = "1.12.0"  # trl.experimental.ppo.PPOTrainer: removed in 1.13
STAMP = "rft-env.json"
# Packages the TRL side imports beyond TRL's own requirements (peak-memory readings, LoRA).
EXTRA = ("psutil",)


def base_site_dirs() -> list[str]:
    """This interpreter's site-packages (the venv's when it is one), in path order."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if Path(d).is_dir()]


def _torch_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:
        return None


def env_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _stamp_wanted(version: str) -> dict:
    return {
        "trl": version,
        "python": sys.version.split()[0],
        "base_executable": getattr(sys, "_base_executable", sys.executable),
        "base_site": base_site_dirs(),
        "torch": _torch_version(),
    }


def env_ready(env: Path, version: str) -> bool:
    """The environment exists, has this TRL, and was made from this interpreter as it is now."""
    stamp = env / STAMP
    if not (env_python(env).exists() and stamp.exists()):
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except ValueError:
        return False
    wanted = _stamp_wanted(version)
    return all(recorded.get(k) == v for k, v in wanted.items())


def _env_site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    )
    return Path(out.stdout.strip())


def create_env(version: str, envs: Path = ENVS, log=print) -> Path:
    """Make `envs/trl-VERSION` (replacing a stale one); returns its interpreter."""
    env = envs / f"trl-{version}"
    log(f"[trl_envs] making {env} (trl=={version}) ...")
    shutil.rmtree(env, ignore_errors=True)
    envs.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    python = env_python(env)
    # Appended after the environment's own site-packages: what pip installs there wins.
    purelib = _env_site_packages(python)
    (purelib / "_rft_base_site.pth").write_text("".join(d + "\n" for d in base_site_dirs()))
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", f"trl=={version}", *EXTRA]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install trl=={version} failed in {env}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    check = subprocess.run(
        [str(python), "-c",
         "import json, torch, transformers, accelerate, datasets, trl; print(json.dumps({m.__name__: m.__version__ "
         "for m in (torch, transformers, accelerate, datasets, trl)}))"],
        capture_output=True, text=True,
    )
    if check.returncode != 0:
        raise RuntimeError(f"{env}: importing TRL failed:\n{check.stderr[-3000:]}")
    versions = json.loads(check.stdout.strip().splitlines()[-1])
    if versions["trl"] != version:
        raise RuntimeError(f"{env}: asked for trl {version}, got {versions['trl']}")
    (env / STAMP).write_text(json.dumps({**_stamp_wanted(version), "versions": versions}, indent=1))
    log(f"[trl_envs] {env}: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return python


def ensure_env(version: str, envs: Path = ENVS, log=print) -> Path:
    """The interpreter of the environment for `trl==version`, made first if missing or stale."""
    env = envs / f"trl-{version}"
    if env_ready(env, version):
        return env_python(env)
    return create_env(version, envs, log)


def env_versions(python: str | Path) -> dict[str, str]:
    """What an environment's interpreter imports (recorded in the benchmark's JSON)."""
    stamp = Path(python).absolute().parent.parent / STAMP
    if stamp.exists():
        try:
            return dict(json.loads(stamp.read_text()).get("versions", {}))
        except ValueError:
            pass
    return {}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", default=f"{TRL_GRPO},{TRL_PPO}", help="comma-separated TRL versions")
    ap.add_argument("--envs-dir", default=str(ENVS), help="where the environments live")
    ap.add_argument("--force", action="store_true", help="make them again even when up to date")
    args = ap.parse_args(argv)
    for version in [v.strip() for v in args.versions.split(",") if v.strip()]:
        envs = Path(args.envs_dir)
        python = create_env(version, envs) if args.force else ensure_env(version, envs)
        print(f"trl {version}: {python}")


if __name__ == "__main__":
    main()
