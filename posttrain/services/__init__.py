"""Business rules: each service validates eagerly, calls the store, and raises ``posttrain.errors``."""
