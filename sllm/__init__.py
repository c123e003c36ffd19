"""sllm: a serverless runtime for LLM functions.

This package is the ground floor: the contracts every component shares (configuration, the
manifest schema, the etcd key schema, wire messages, errors, the stream framing). It imports
nothing of sllm's other packages; they import it.
"""

__version__ = "0.1.0"
