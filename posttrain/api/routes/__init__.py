"""One module per resource. Each handler is registered under every path generation the official
clients use (``/v1``, ``/v1alpha``, ``/v1beta``), so old and new clients work unchanged."""
