"""Top-k saturation on images (issue 33): "Looking Beyond the Top-1" (Lioubashevski et al. 2024) on a ViT
image classifier (:class:`~lensmat.models.vision.VisionClassifier`).

One ranked position per image, the CLS token, as in the authors' ViT code (``model.classifier(
layernorm(h)[:, 0])`` at every block output): the lens reads ``h_l``'s CLS vector through the final
LayerNorm and the classifier head (the logit lens), or first through the least-squares map
``h_l → h_L`` fitted on the CLS vectors of the ``train`` images (the mat lens; ``mat-affine`` with an
intercept), and ranks the classes (ties: the lowest class id first, as the text readout). Layer ``L``
is the model's own output. :func:`image_saturation_layers` returns ``s_k`` of every held-out image
(``saturation_layers(..., start=1)``), each image as its own document, the CLS residuals for the
probes, and the report's model and protocol fields; :func:`lensmat.analyses.saturation.saturation`
adds the protocol's statistics (``order_statistics``) to them. The implant intervention is not run on
images: its fields are ``null``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from lensmat.analyses.saturation_rankings import saturation_layers
from lensmat.data.images import ImageSet, load_images
from lensmat.models import describe
from lensmat.stats.collect import resid_hook, resid_hooks
from lensmat.stats.fit import LinearMap, fit_to_last

VISION_LENSES = ("logit", "mat", "mat-affine")


@torch.no_grad()
def cls_residuals(model, pixel_values: Float[torch.Tensor, "n c h w"]) -> Float[torch.Tensor, "layers n d"]:
    """The CLS vector of every residual layer ``h_0..h_L`` (``[L+1, n, d_model]``, float32 on the CPU), from
    one forward of ``pixel_values`` (the model's input, :meth:`~lensmat.models.vision.VisionClassifier.pixel_values`)."""
    hooks = resid_hooks(int(model.cfg.n_layers))
    _, cache = model.run_with_cache(pixel_values, names_filter=lambda name: name in hooks)
    return torch.stack([cache[h][:, 0].float().cpu() for h in hooks])


def _batches(images: ImageSet, batch_size: int):
    for i in range(0, len(images), batch_size):
        yield i, images.images[i: i + batch_size]


@torch.no_grad()
def fit_cls_maps(model, images: ImageSet, *, intercept: bool = False, batch_size: int = 64,
                 progress: bool = True) -> dict[int, LinearMap]:
    """The mat lens's maps ``h_l → h_L`` (``1 ≤ l < L``) by least squares on the CLS vectors of ``images``,
    through lensmat's streaming statistics (:func:`~lensmat.stats.fit.fit_to_last`); keyed by the source layer.
    None for ``h_0``: its CLS vector is the CLS embedding plus its position, the same for every image (a
    rank-1 Gram matrix), and the protocol does not read layer 0."""
    from tqdm.auto import tqdm

    n_layers = int(model.cfg.n_layers)
    batches = tqdm(list(_batches(images, batch_size)), desc="fit mat (CLS)", unit="batch", disable=not progress)
    maps, _ = fit_to_last((cls_residuals(model, model.pixel_values(batch))[1:] for _, batch in batches),  # h_1..h_L
                          tuple(resid_hooks(n_layers))[1:], intercept=intercept, what="train images")
    return {layer: maps[(resid_hook(layer), resid_hook(n_layers))] for layer in range(1, n_layers)}


def ranked_classes(logits: Float[torch.Tensor, "... classes"], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` class ids and their probabilities; equal logits rank the lowest class id first."""
    order = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[..., :k]
    return order, logits.float().softmax(-1).gather(-1, order)


@dataclass
class ImageRankings:
    """The lens's top-K classes at every residual layer for each image: ``lens_topk`` / ``lens_topp``
    ``[L+1, n, K]`` (layer ``L`` = the model's output), the CLS residuals ``resid`` ``[L+1, n, d]``, the
    images' ``labels`` and ``index`` (their position in the whole dataset)."""

    lens_topk: Int[torch.Tensor, "layers n k"]
    lens_topp: Float[torch.Tensor, "layers n k"]
    resid: Float[torch.Tensor, "layers n d"]
    labels: Int[torch.Tensor, "n"]
    index: Int[torch.Tensor, "n"]

    @property
    def final_topk(self) -> Int[torch.Tensor, "n k"]:
        return self.lens_topk[-1]

    @property
    def accuracy(self) -> float:
        """The model's top-1 against the images' labels."""
        return float((self.final_topk[:, 0] == self.labels).double().mean())


@torch.no_grad()
def rank_images(model, images: ImageSet, *, maps: dict[int, LinearMap] | None = None, k: int = 5,
                batch_size: int = 64, progress: bool = True) -> ImageRankings:
    """Every image's top-``k`` classes at every residual layer through the logit lens, or through ``maps``
    (:func:`fit_cls_maps`, keyed by layer) then the logit lens where ``maps`` has the layer (layer 0 and
    ``L`` are read without one: ``L`` is the model's own logits)."""
    from tqdm.auto import tqdm

    n_layers = int(model.cfg.n_layers)
    tops, probs, resids = [], [], []
    for _, batch in tqdm(list(_batches(images, batch_size)), desc="rankings", unit="batch", disable=not progress):
        resid = cls_residuals(model, model.pixel_values(batch))
        rows = torch.stack([maps[layer](resid[layer]) if maps is not None and layer in maps else resid[layer]
                            for layer in range(n_layers + 1)])
        ids, p = ranked_classes(model.readout(rows), k)
        tops.append(ids.cpu())
        probs.append(p.cpu())
        resids.append(resid)
    if not tops:
        raise ValueError(f"No images to rank: the {images.name!r} {images.split} split is empty.")
    return ImageRankings(torch.cat(tops, 1), torch.cat(probs, 1), torch.cat(resids, 1), images.labels, images.index)


def image_saturation_layers(model, dataset: str | None = None, *, lens: str = "logit", k: int = 5,
                            max_fit_images: int | None = None, max_images: int | None = None, batch_size: int = 64,
                            progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """``(s, documents, resid, fields)`` of the saturation protocol on the ``heldout`` images of ``dataset``
    (default ``"digits"``, :func:`~lensmat.data.images.load_images`; the first ``max_images``): ``s_k``
    ``[n, k]`` (residual layers, block outputs only), one document per image, the CLS residuals
    ``[L+1, n, d]`` and the report's fields that say what was read (model, lens, k, ``modality``,
    ``protocol``, dataset, image counts, held-out accuracy; the implant's fields ``null``). The mat lenses
    are fitted on the first ``max_fit_images`` ``train`` images (all by default)."""
    if lens not in VISION_LENSES:
        raise ValueError(f"The {lens!r} lens is not defined for a vision model; valid: {', '.join(VISION_LENSES)} "
                         "(the tuned lenses are trained on text).")
    for what, n in (("max_images", max_images), ("max_fit_images", max_fit_images)):
        if n is not None and n < 1:
            raise ValueError(f"{what}={n}: rank at least one image.")
    heldout = load_images(dataset, "heldout").head(max_images)
    maps, n_fit = None, 0
    if lens.startswith("mat"):
        train = load_images(dataset, "train").head(max_fit_images)
        maps, n_fit = fit_cls_maps(model, train, intercept=lens == "mat-affine", batch_size=batch_size,
                                   progress=progress), len(train)
    ranked = rank_images(model, heldout, maps=maps, k=k, batch_size=batch_size, progress=progress)
    s = saturation_layers(ranked.lens_topk, ranked.final_topk, start=1)
    info = describe(model)
    fields = {"model": info.name, "model_info": info.to_dict(), "n_layers": int(model.cfg.n_layers), "lens": lens, "k": k,
              "modality": "vision", "protocol": "image",
              "position": "CLS token of each image (final LayerNorm + classifier head, as the model reads it)",
              "dataset": heldout.provenance(), "n_images": len(heldout), "n_fit_images": n_fit,
              "heldout_accuracy": ranked.accuracy,
              "intervention_success": None, "intervention_trials": None, "intervention_sweep": None,
              "intervention_note": "the implant intervention is not run on images"}
    return s, torch.arange(len(heldout)), ranked.resid, fields
