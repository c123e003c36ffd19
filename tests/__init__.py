"""sllm's tests, told apart by folder:

- ``tests/unit/``: pure logic with plain data, and in-process code against the real thing where
  it has I/O (files, uvicorn in a thread on loopback, the session's etcd server from
  ``tests/conftest.py``, a checker such as ``lint-imports``). A unit test starts none of the
  runtime's processes.
- ``tests/e2e/``: tests that start the runtime's processes (etcd, controller, gateway, invoker,
  the ``sllm`` CLI), through :func:`tests.helpers.cluster.running_cluster` or one by one.
- ``tests/helpers/``: what the tests share (a package, never a conftest): the cluster factory
  and the gateway client, the tiny model, the pool's invokers and instances, the lock check.

``tests/conftest.py`` holds the fixtures only. Test modules keep unique names across the
folders (``tests.unit.test_x``, ``tests.e2e.test_y``).
"""
