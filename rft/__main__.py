"""`python -m rft ...` (e.g. under `accelerate launch -m rft train sft`)."""

from rft.cli import main

main()
