"""Recovery and evaluation in pure torch: no Ray; the stages compose these.

- :mod:`~unidd_ray.core.plan`: which classes each worker optimises in which round, and the real starts;
- :mod:`~unidd_ray.core.recovery`: the ``Distiller`` (one batch of synthetic images) and the rounds of a
  recovery in one process;
- :mod:`~unidd_ray.core.evaluation`: training a student on a distilled set and testing it.
"""
