"""cli: the ``sllm`` command line (:mod:`cli.main`) and the embedded runtime it starts on one
machine (:mod:`cli.launcher`: etcd, the controller, the gateway and the invokers as processes).

The top layer: it talks to the services over HTTP and starts them as processes, never imports
them.
"""
