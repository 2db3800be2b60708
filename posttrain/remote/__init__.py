"""The HTTP-client side of the ``posttrain`` command: ``posttrain datasets …``, ``posttrain jobs …`` and
``posttrain models list|export``
talk to a running server (``--url`` / ``POSTTRAIN_URL``) and import nothing of the server side."""

from posttrain.remote.datasets import app as datasets_app
from posttrain.remote.jobs import app as jobs_app
from posttrain.remote.models import app as models_app

__all__ = ["datasets_app", "jobs_app", "models_app"]
