"""Where a run keeps its files and how it splits over processes, for evaluation and tuning alike
(``ARCHITECTURE.md``): ``cache`` (the cache folder of teacher trajectories, FID statistics, searches) and
``distributed`` (the ``torchrun`` context, each rank's device)."""
