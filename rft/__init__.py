"""The `rft` command: one module per command group, above the library (`rft_core`) and the flows.

`rft.cli` builds the typer app; `run` (run, train), `validate`, `grade`, `registry` (promote,
rollback, models) and `serve` hold the commands; `errors` is the one way a command fails. The library
never imports this package: it raises exceptions, and the commands turn them into messages and exit
codes.
"""
