"""The training process: ``python -m posttrain.trainer SPEC.json``.

It runs as its own child process so the worker can signal or kill it and so torch never enters the
API, store or worker import paths. It talks to its launcher only through JSON lines on stdout, as
described in ``docs/trainer-protocol.md``; it imports nothing of the package but ``posttrain.domain``.
Importing this package is cheap: the heavy libraries are imported by the modules that need them.
"""
