"""The gateway: a Serve replica per serving node that owns worker processes serving gRPC.

- :mod:`deepserve.gateway.replica`: the Serve deployment (``Gateway``). It starts one worker
  process per CPU core it is given, restarts one that dies, collects their metrics and load
  (for autoscaling), answers for them (status), and drains them when Serve stops it. It
  holds the Serve handles of the models placed ``deployment``.
- :mod:`deepserve.gateway.worker`: a worker process. It runs the gRPC server (all workers
  share the port) over its own dataplane, with the sessions of the models placed
  ``gateway``. It is not a Ray worker and never imports Ray: no Ray thread shares its GIL,
  which is what a request's CPU time went to before (docs/benchmarks.md).
- :mod:`deepserve.gateway.channel`: the private channel between the two (gRPC over unix
  sockets): workers reach the ``deployment`` models through the replica, the replica asks
  workers for their status and metrics.
- :mod:`deepserve.gateway.front`: the admission front (``admission_front``): nginx on the port,
  in front of the workers, refusing beyond a bound of calls in flight; the replica runs it.

This package's ``__init__`` imports nothing: a worker must not import Ray by accident.
"""
