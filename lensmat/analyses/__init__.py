"""Analyses: what the lenses and maps say about a model, each returned as a report dict.

The layer above :mod:`lensmat.lenses` (it may import lenses, stats, data, models and the bottom
modules, never :mod:`lensmat.reports` or the CLI, which write what it returns). One module per
question: :mod:`~lensmat.analyses.compare` (lenses layer by layer), :mod:`~lensmat.analyses.transfer`
(each lens of layer i read at every layer j), :mod:`~lensmat.analyses.submodules`
with :mod:`~lensmat.analyses.swap` (sub-modules replaced by their maps), :mod:`~lensmat.analyses.linearity`
("Your Transformer is Secretly Linear"), :mod:`~lensmat.analyses.saturation` ("Looking Beyond the
Top-1"), :mod:`~lensmat.analyses.early_exit` and :mod:`~lensmat.analyses.generation` (early exit),
:mod:`~lensmat.analyses.trajectory` (prediction trajectories, with :mod:`~lensmat.analyses.trajectory_follow` for followed tokens), :mod:`~lensmat.analyses.intervene`
(any hook or swap scored against the clean model) with :mod:`~lensmat.analyses.intervene_view` (every lens
read in a clean and an intervened forward: hooks, swaps, steering, ablation), :mod:`~lensmat.analyses.attribution` (which attention
or MLP moved one prediction, read through lenses and checked by ablation and swaps). The papers' analyses do not
import each other (an import-linter contract), except early exit, which builds on saturation's
rankings. The map of the layers: ``docs/modules.md``.
"""
