"""TransformerLens's Jacobian lens (Gurnee et al. 2026) behind lensmat's :class:`~lensmat.lenses.base.Lens`.

Fitting and transport are TransformerLens's own (``transformer_lens.tools.analysis.JacobianLens``);
this module only adapts the layer convention and the file format:

- TransformerLens indexes the J-lens by block output: its layer ``j`` is ``blocks.{j}.hook_out``,
  which is lensmat's residual layer ``l = j + 1``. The J-lens has no matrix for the embeddings
  (``l = 0``): :meth:`JLens.covers` is ``False`` there and reports hold ``null`` at that layer.
- Saved lenses are a lensmat folder (``lens.safetensors`` + ``meta.json``). TransformerLens's own
  ``.pt`` artifacts load too, through its ``JacobianLens.load`` (``torch.load(weights_only=True)``). Both are
  checked on load (:meth:`JLens.load`): the matrices, and that the lens fits the model.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from lensmat import data
from lensmat.stats.collect import check_layer
from lensmat.lenses.base import Lens
from lensmat.models import ModelMismatchError, check_same_model, describe, require_causal


class JLens(Lens):
    """The J-lens: ``transform_hidden(h_l, l) = J_{l-1} h_l`` (TransformerLens's transport), identity at ``L``.

    Its matrices are buffers ``J_{j}`` (``[d, d]``, TransformerLens's block index ``j = l - 1``) that
    ``self.jlens.jacobians`` shares, so ``.to()``, ``state_dict()`` and ``load_state_dict()`` act on
    the matrices TransformerLens's ``transport`` reads (its per-device cache is cleared after each).
    """

    name = "jacobian"

    def __init__(self, model, jlens, meta: dict | None = None) -> None:
        super().__init__(model)
        jlens.validate_model(model)
        self.jlens = jlens
        for j, matrix in jlens.jacobians.items():
            self.register_buffer(f"J_{j}", matrix)
        self.meta = meta or {"model": describe(model).to_dict()}

    def _sync(self) -> None:
        """Point TransformerLens's matrices at the buffers again and drop its cached device copies."""
        self.jlens.jacobians = {j: getattr(self, f"J_{j}") for j in self.jlens.jacobians}
        self.jlens.clear_device_cache()

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .float(), ...: buffers replaced
        super()._apply(fn, recurse)
        self._sync()
        return self

    def _load_from_state_dict(self, *args, **kwargs):  # buffers written in place
        super()._load_from_state_dict(*args, **kwargs)
        self._sync()

    def covers(self, layer: int) -> bool:
        layer = check_layer(layer, self.n_layers)
        return layer == self.n_layers or (layer - 1) in self.jlens.jacobians

    def transform_hidden(self, h, layer):
        layer = check_layer(layer, self.n_layers)
        if layer == self.n_layers:
            return h
        if not self.covers(layer):
            raise ValueError(f"This J-lens has no matrix for residual layer {layer}; it covers layers "
                             f"{[j + 1 for j in self.jlens.source_layers]} and {self.n_layers}.")
        return self.jlens.transport(h, layer - 1).to(h.dtype)

    def save(self, path: str | os.PathLike, force: bool = False):
        from lensmat.stats import artifacts as io

        tensors = {f"J.{j}": m for j, m in self.jlens.jacobians.items()}
        meta = {"lens": "jacobian", "n_prompts": self.jlens.n_prompts, "d_model": self.jlens.d_model,
                "tl_metadata": self.jlens.metadata, **self.meta}
        return io.save_artifact(path, "lens", tensors, meta, force=force)

    @classmethod
    def load(cls, path: str | os.PathLike, model) -> "JLens":
        """Load a lensmat J-lens folder, or a TransformerLens ``.pt`` artifact or fit checkpoint, checked: its
        matrices floating-point, finite and ``d_model × d_model`` (:func:`lensmat.stats.artifacts.check_tensors`, read before
        TransformerLens turns them into floats), a folder's model identity
        (:func:`~lensmat.models.identity.check_same_model`), and TransformerLens's ``validate_model`` (``d_model``, source
        blocks within the model, the model name and revision its metadata records) as a
        :class:`~lensmat.models.identity.ModelMismatchError`."""
        from transformer_lens.tools.analysis import JacobianLens

        from lensmat.stats import artifacts as io

        fix = "refit the J-lens (lensmat.fit_jlens) or re-copy it."
        if Path(path).is_file():
            jlens, meta = _read_tl_file(path, fix), None
        else:
            tensors, meta = io.load_artifact(path, "lens")
            if meta.get("lens") != "jacobian":
                raise io.ArtifactError(f"{path} does not hold a J-lens (lens={meta.get('lens')!r}).")
            check_same_model(meta["model"], model, what=f"the J-lens in {path}")
            d = int(model.cfg.d_model)
            io.check_tensors(f"{path}/lens.safetensors", tensors,
                             {k: (d, d) for k in tensors if re.fullmatch(r"J\.\d+", k)}, f"the file is corrupted; {fix}")
            jac = {int(k.split(".", 1)[1]): v for k, v in tensors.items()}
            jlens = JacobianLens(jac, n_prompts=meta["n_prompts"], d_model=d, metadata=meta.get("tl_metadata"))
        try:
            jlens.validate_model(model)
        except ValueError as err:
            name = getattr(model.cfg, "model_name", "this model")
            raise ModelMismatchError(f"The J-lens in {path} does not fit {name!r}: {err} Load the J-lens fitted on this "
                                     "model, or fit one (lensmat.fit_jlens).") from None
        return cls(model, jlens, meta)


def _read_tl_file(path: str | os.PathLike, fix: str):
    """TransformerLens's ``JacobianLens.load`` of a ``.pt`` file, once its matrices (``J``, or a fit checkpoint's
    ``jacobian_sum``) pass :func:`lensmat.stats.artifacts.check_tensors`."""
    import zipfile

    from transformer_lens.tools.analysis import JacobianLens

    from lensmat.stats import artifacts as io

    payload = io.load_torch_tensors(path, fix, mmap=zipfile.is_zipfile(path))  # mapped: TransformerLens reads it again
    key = next((k for k in ("J", "jacobian_sum") if isinstance(payload, dict) and isinstance(payload.get(k), dict)), None)
    if key is None:
        raise io.ArtifactError(f"{path} is not a TransformerLens J-lens (a 'J' dict of matrices, or a fit checkpoint's "
                               f"'jacobian_sum'); {fix}")
    d = payload.get("d_model") if key == "J" and isinstance(payload.get("d_model"), int) else None
    matrices = {f"{key}[{layer!r}]": m for layer, m in payload[key].items()}
    io.check_tensors(path, matrices, {k: (d, d) for k in matrices}, fix)
    try:
        return JacobianLens.load(str(path))
    except (ValueError, KeyError, TypeError) as err:
        raise io.ArtifactError(f"TransformerLens could not read the J-lens in {path} ({err}); {fix}") from None


def fit_jlens(model, dataset: str | None = None, *, n_prompts: int = 100, max_length: int = data.DEFAULT_MAX_LENGTH,
              dim_batch: int = 32, skip_first_positions: int | None = None, progress: bool = True) -> JLens:
    """Fit TransformerLens's J-lens on the first ``n_prompts`` lines of the ``train`` split.

    TransformerLens averages each prompt's Jacobian over its source positions
    ``skip_first_positions .. seq_len − 2`` (default: its ``DEFAULT_SKIP_FIRST_POSITIONS``, 16) and
    skips prompts with no such position; the provenance records the prompts it used
    (``n_prompts``), the tokens they hold (``n_tokens``) and the positions it averaged
    (``n_positions``). Cost: one forward and ``ceil(d_model / dim_batch)`` backward passes (each over
    ``dim_batch`` copies of the prompt) per used prompt; raise ``dim_batch`` for speed, lower it for memory.
    """
    import warnings

    from transformer_lens.tools.analysis import JacobianLens
    from transformer_lens.tools.analysis.jacobian_lens import DEFAULT_SKIP_FIRST_POSITIONS

    require_causal(model, "The J-lens")
    skip = DEFAULT_SKIP_FIRST_POSITIONS if skip_first_positions is None else skip_first_positions
    spec = str(dataset or data.DEFAULT_CORPUS)
    lines = data.load_lines(spec, "train")[:n_prompts]
    lengths = [min(int(model.to_tokens(line).shape[1]), max_length) for line in lines]  # as TransformerLens cuts them
    used = [n for n in lengths if n > skip + 1]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="skipping prompt with only")  # counted below instead
        jlens = JacobianLens.fit(model, lines, corpus=f"{spec}:train[:{n_prompts}]", dim_batch=dim_batch,
                                 max_seq_len=max_length, skip_first_positions=skip, show_progress=progress)
    if len(used) != jlens.n_prompts:
        raise RuntimeError(f"TransformerLens used {jlens.n_prompts} prompts where lensmat counted {len(used)}: "
                           "its prompt-length rule has changed; please report this with your TransformerLens version.")
    meta = {"model": describe(model).to_dict(),
            "provenance": {"dataset": spec, "split": "train", "n_lines": len(lines), "n_prompts": jlens.n_prompts,
                           "n_tokens": sum(used), "n_positions": sum(n - skip - 1 for n in used),
                           "skip_first_positions": skip, "fit_seconds": time.perf_counter() - start}}
    return JLens(model, jlens, meta)
