"""posttrain: a self-hosted fine-tuning server behind the Llama Stack Post-Training API.

The package is layered so data flows one way (see docs/architecture.md and the import-linter
contracts in ``.importlinter``): ``api -> services -> store -> domain`` on the request side,
``worker -> store -> domain`` on the scheduling side, and ``trainer -> domain`` in the child
process that actually trains.
"""

__version__ = "0.1.0"
