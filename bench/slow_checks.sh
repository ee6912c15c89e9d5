#!/usr/bin/env bash
# The checks too slow for the suite (`python -m pytest`, under 20 minutes on 2 cores), run apart:
# tests marked `slow` (several processes and FSDP, kill -9 and Ctrl-C mid-training and their
# recoveries, the served model in a fresh environment of its requirements, the API's crash and
# deployment paths) and `ray` (the pipeline on real Ray clusters). About 25 minutes on 2 cores.
# CI runs it after the suite. Prints the slowest checks; the JUnit report goes to
# bench/results/slow_checks.xml. Extra arguments go to pytest (`-k fsdp`, `-x`).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
exec python -m pytest -m "slow or ray" --durations=25 --junitxml=bench/results/slow_checks.xml "$@"
