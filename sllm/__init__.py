"""sllm: a serverless runtime for LLM functions.

This package holds what the components share: configuration, the manifest schema, the etcd key
schema, wire messages, errors, and the ``sllm`` command line.
"""

__version__ = "0.1.0"
