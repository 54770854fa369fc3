"""kubetune's node agent: a small kubelet (and scheduler) for a machine without Docker.

It registers a Ready Node, binds pending pods that fit on it and runs their containers as local
processes in private mount and PID namespaces, reporting their state back to the API server.
See docs/nodeagent.md for what it supports. Run it with ``python -m kubetune_nodeagent``, or for
a running local control plane with ``kubetune_localenv.agents.start_agent``. It listens on no port.

Modules: :mod:`.agent` (the reconcile loop), :mod:`.node` (the Node and its Lease),
:mod:`.scheduling` (fit rules and binding), :mod:`.worker` (one pod's life), :mod:`.mounts`,
:mod:`.containers` and :mod:`.podstatus` (the worker's helpers), :mod:`.podspec` (volumes and
env from the pod spec), :mod:`.exec_helper` (the "container runtime" process), :mod:`.images`
(the image table) and :mod:`.cgroup` (memory limits).
"""
