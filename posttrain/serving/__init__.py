"""The serving worker: its own process that holds models in memory and generates text for the API.

``python -m posttrain.serving --socket PATH --memory-bytes N`` answers HTTP on a Unix socket
(``POST /generate``, ``GET /stats``, ``POST /forget``). It imports only ``posttrain.domain`` of the
package, plus torch, transformers and peft, so the API process never loads a model (the protocol is
``posttrain.domain.serving``; the API's side is ``posttrain.services.serving.ServingClient``).
"""
