"""Readers of the on-disk dataset formats; each module exposes ``load(root, **options)``.

They are registered under their public names in :mod:`unidd_ray.data.sources`; use
:func:`unidd_ray.data.sources.load_source` rather than calling them directly.
"""
