"""Statistics and maps: hook activations -> float64 sufficient statistics -> least-squares maps.

The layer above :mod:`lensmat.data` and :mod:`lensmat.models` (it may import them and the bottom
modules; nothing above). :mod:`~lensmat.stats.collect` runs batches and captures hooks (with
checkpoints); :mod:`~lensmat.stats.gram` holds the Gram statistics; :mod:`~lensmat.stats.fit`
turns them into :class:`~lensmat.stats.fit.LinearMap` / :class:`~lensmat.stats.fit.MapSet`;
:mod:`~lensmat.stats.artifacts` saves and checks them (safetensors + JSON); :mod:`~lensmat.stats.plan`
refuses a run whose memory does not fit before any work; :mod:`~lensmat.stats.distributed` sums
statistics over ranks; :mod:`~lensmat.stats.pipeline` is text -> maps in one call
(:func:`~lensmat.stats.pipeline.fit_maps`); :mod:`~lensmat.stats.bootstrap` keeps per-document sums and resamples
documents for the intervals and paired tests of every report. The map of the layers: ``docs/modules.md``.
"""
