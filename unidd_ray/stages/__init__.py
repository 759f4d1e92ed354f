"""The stage programs of a distillation: squeeze (the teacher), stats (the real statistics), recover (the
distilled images), subset (the random real baseline), evaluate (students on a set) and relabel (stored soft
labels).  Each runs on Ray where it needs to, reads and writes artifacts (:mod:`unidd_ray.artifacts`), checks
its inputs before any work, and never imports another stage."""
