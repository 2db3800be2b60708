"""The HTTP edge: request and response schemas, routes, error translation. Imports services and domain only."""
