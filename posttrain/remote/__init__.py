"""The HTTP-client side of the ``posttrain`` command: ``posttrain datasets …`` and ``posttrain jobs …``
talk to a running server (``--url`` / ``POSTTRAIN_URL``) and import nothing of the server side."""

from posttrain.remote.datasets import app as datasets_app
from posttrain.remote.jobs import app as jobs_app

__all__ = ["datasets_app", "jobs_app"]
