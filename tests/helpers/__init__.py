"""What the tests share besides fixtures (those are in ``tests/conftest.py``), imported from here
by the tests and never from a conftest:

- :mod:`tests.helpers.cluster`: the one way to run the runtime for a test
  (:func:`~tests.helpers.cluster.running_cluster`), and calls against it;
- :mod:`tests.helpers.tiny_model`: small random-weight llamas built offline;
- :mod:`tests.helpers.pools`: invoker records, instances and silent invokers for the instance
  pool's tests;
- :mod:`tests.helpers.kv_rounds`: a KV cache recomputed in rounds, as a migration's destination
  does;
- :mod:`tests.helpers.lock`: the lock file against the installed versions.
"""
