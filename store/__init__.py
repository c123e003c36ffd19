"""store: where checkpoints live and how they move (ServerlessLLM's checkpoint store, OSDI'24 §4).

- :mod:`store.checkpoint`: the loading-optimized checkpoint format, writing one, and the
  multi-tier loader (SSD or DRAM tier into one buffer, then the device);
- :mod:`store.dram_pool`: the DRAM tier, a pre-faulted pool caching recently loaded checkpoints;
- :mod:`store.model_store`: a folder of checkpoints by model name (each invoker's local store,
  and the store root);
- :mod:`store.importer`: turning a Hugging Face folder or a GGUF file into a checkpoint;
- :mod:`store.files_api` and :mod:`store.transfer`: serving a store's checkpoints over HTTP, and
  fetching one from a peer or the store root, resumable and checksummed.

It sits above the ground floor (:mod:`sllm`, :mod:`native_loader`) and below the services and
the CLI, which all use it.
"""
