"""Running on Ray: start-up and what embedded instances leave (:mod:`~unidd_ray.runtime.cluster`), the
process-group rendezvous (:mod:`~unidd_ray.runtime.rendezvous`), Ray Train runs and their retries
(:mod:`~unidd_ray.runtime.train`), the elastic actor pool (:mod:`~unidd_ray.runtime.pool`), progress and
Ray's own output (:mod:`~unidd_ray.runtime.console`).  Every use of a private Ray API is wrapped once in
:mod:`~unidd_ray.runtime.private`, with the reason.
"""
