"""Resume, determinism, atomic artifacts and the bad-input catalogue (docs/errors.md)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import make_tiny_model, random_token_batches
from lensmat.stats import artifacts as io
from lensmat.stats.collect import collect, resid_hooks
from lensmat.stats.fit import MapSet, fit_layer_maps
from lensmat.lenses.base import LogitLens, MatLens
from lensmat.lenses.metrics import evaluate_lenses
from lensmat.models import ModelMismatchError, describe

@pytest.mark.parametrize("kill_after", [3, 5, 11])  # batches run before the kill; checkpoints every 2
def test_killed_fit_resumes_to_identical_statistics(tmp_path, kill_after):
    ckpt = tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from conftest import make_tiny_model, random_token_batches
        from lensmat.stats.collect import collect, resid_hooks
        model = make_tiny_model()
        batches = random_token_batches(12, 4, 12, 40, seed=0)
        def die(act, hook, count=[0]):
            count[0] += 1
            if count[0] > {kill_after}:
                os._exit(9)  # killed mid-fit, no cleanup
        model.add_hook("blocks.0.hook_resid_pre", die)
        collect(model, batches, [resid_hooks(3)], checkpoint={str(ckpt)!r}, checkpoint_every=2, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert json.loads((ckpt / "meta.json").read_text())["n_batches"] == kill_after - kill_after % 2
    model = make_tiny_model()
    batches = random_token_batches(12, 4, 12, 40, seed=0)
    resumed = collect(model, batches, [resid_hooks(3)], checkpoint=ckpt, resume=True, progress=False)[0]
    straight = collect(model, batches, [resid_hooks(3)], progress=False)[0]
    assert resumed.n == straight.n
    assert torch.equal(resumed.gram, straight.gram) and torch.equal(resumed.sum, straight.sum)
    with pytest.raises(io.ArtifactError, match="other hook groups"):
        collect(model, batches, [resid_hooks(3)[:2]], checkpoint=ckpt, resume=True, progress=False)


def misaligned(t: torch.Tensor, offset: int = 40) -> torch.Tensor:
    """A copy of ``t`` viewing a larger buffer ``offset`` bytes past a 64-byte boundary (as safetensors hands
    tensors back), in storage PyTorch did not allocate for it alone."""
    raw = torch.empty(t.nbytes + 2 * io.ALIGNMENT + offset, dtype=torch.uint8)
    start = (-raw.data_ptr()) % io.ALIGNMENT + offset
    out = raw[start: start + t.nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % io.ALIGNMENT == offset % io.ALIGNMENT
    return out


class MisalignedSafeOpen:
    """``safetensors.safe_open`` whose tensors are all :func:`misaligned` (counts them in ``served``)."""

    served = 0

    def __init__(self, *args, **kwargs):
        from safetensors import safe_open

        self.file = safe_open(*args, **kwargs)

    def __enter__(self):
        self.file.__enter__()
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def keys(self):
        return self.file.keys()

    def get_tensor(self, key):
        MisalignedSafeOpen.served += 1
        return misaligned(self.file.get_tensor(key), offset=8 if key.endswith(".n") else 40)


def is_owned(t: torch.Tensor) -> bool:
    return t.untyped_storage().resizable() and t.data_ptr() % io.ALIGNMENT == 0 and t.is_contiguous()


def test_resume_from_misaligned_checkpoint_is_bit_identical(tmp_path, monkeypatch):
    """Issue 37: MKL on some CPUs adds into a misaligned C matrix in another order, so statistics resumed from
    tensors viewing a file buffer drifted from an uninterrupted fit by ~1e-14. Loaders must hand back owned,
    aligned memory; the alignment check fails without that fix on any CPU, the equality on the affected ones."""
    model = make_tiny_model()
    batches = random_token_batches(12, 4, 12, 40, seed=0)
    collect(model, batches[:4], [resid_hooks(3)], checkpoint=tmp_path / "ckpt", checkpoint_every=2, progress=False)
    monkeypatch.setattr(io, "safe_open", MisalignedSafeOpen)
    MisalignedSafeOpen.served = 0
    resumed = collect(model, batches, [resid_hooks(3)], checkpoint=tmp_path / "ckpt", resume=True, progress=False)[0]
    assert MisalignedSafeOpen.served == 2 + len(resumed.panels)  # sum, n and every panel came misaligned
    assert all(is_owned(t) for t in (resumed.sum, *resumed.panels))
    straight = collect(model, batches, [resid_hooks(3)], progress=False)[0]
    assert resumed.n == straight.n
    assert torch.equal(resumed.gram, straight.gram) and torch.equal(resumed.sum, straight.sum)


def test_every_loader_hands_back_owned_aligned_tensors(tmp_path, monkeypatch):
    import numpy as np

    x = torch.randn(6, 5, dtype=torch.float64)
    assert io.owned(x) is x  # already owned: no copy
    for foreign in (misaligned(x), x.T, x[1:], torch.from_numpy(x.numpy().copy())):
        got = io.owned(foreign)
        assert is_owned(got) and torch.equal(got, foreign) and got.data_ptr() != foreign.data_ptr()
    model = make_tiny_model()
    stats = collect(model, random_token_batches(2, 4, 10, 40), [resid_hooks(3)], progress=False)[0]
    io.save_maps(MapSet(fit_layer_maps(stats, intercept=True), describe(model).to_dict()), tmp_path / "maps")
    monkeypatch.setattr(io, "safe_open", MisalignedSafeOpen)
    loaded = io.load_maps(tmp_path / "maps")
    assert all(is_owned(m.W) and is_owned(m.b) for m in loaded.maps.values())
    from lensmat.lenses.importers import load_tensor_pickle

    import pickle

    with open(tmp_path / "a.pickle", "wb") as f:
        pickle.dump(np.arange(12.0).reshape(3, 4)[:, 1:], f)
    assert is_owned(load_tensor_pickle(tmp_path / "a.pickle"))


def test_same_inputs_give_bit_identical_maps_and_scores():
    def run():
        model = make_tiny_model(seed=4)
        batches = random_token_batches(5, 6, 14, 40, seed=1)
        stats = collect(model, batches, [resid_hooks(3)], progress=False)[0]
        maps = MapSet(fit_layer_maps(stats, all_pairs=True), describe(model).to_dict())
        scores, _, _ = evaluate_lenses(model, {"logit": LogitLens(model), "mat": MatLens(model, maps)}, batches,
                                       progress=False)
        return maps, scores

    (m1, s1), (m2, s2) = run(), run()
    assert all(torch.equal(m1.maps[k].W, m2.maps[k].W) for k in m1.maps)
    assert json.dumps(s1) == json.dumps(s2)


def test_interrupted_write_leaves_nothing_that_loads(tmp_path, monkeypatch):
    model = make_tiny_model()
    stats = collect(model, random_token_batches(3, 4, 10, 40), [resid_hooks(3)], progress=False)[0]
    maps = MapSet(fit_layer_maps(stats), describe(model).to_dict())
    target = tmp_path / "maps"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_maps(maps, target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    io.save_maps(maps, target)
    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_maps(maps, target, force=True)  # an interrupted overwrite keeps the old folder intact
    assert io.load_maps(target, model).maps.keys() == maps.maps.keys()


@pytest.mark.parametrize("damage,match", [
    (lambda p: (p / "maps.safetensors").write_bytes((p / "maps.safetensors").read_bytes()[:100]), "truncated or corrupted"),
    (lambda p: (p / "meta.json").write_text("{not json"), "not valid JSON"),
    (lambda p: (p / "meta.json").write_text(json.dumps({"kind": "maps"})), "lacks required field"),
    (lambda p: (p / "meta.json").write_text(json.dumps({**json.loads((p / "meta.json").read_text()), "format_version": 99})),
     "upgrade lensmat"),
    (lambda p: (p / "maps.safetensors").unlink(), "not a saved lensmat maps folder"),
])
def test_damaged_artifacts_give_clear_errors(tmp_path, damage, match):
    model = make_tiny_model()
    stats = collect(model, random_token_batches(3, 4, 10, 40), [resid_hooks(3)], progress=False)[0]
    path = io.save_maps(MapSet(fit_layer_maps(stats), describe(model).to_dict()), tmp_path / "m")
    damage(path)
    with pytest.raises(io.ArtifactError, match=match):
        io.load_maps(path, model)


@torch.no_grad()
def test_float32_maps_work_on_a_bfloat16_model():
    model = make_tiny_model()
    batches = random_token_batches(4, 6, 12, 40, seed=2)
    stats = collect(model, batches, [resid_hooks(3)], progress=False)[0]
    maps = MapSet(fit_layer_maps(stats), describe(model).to_dict())
    half = make_tiny_model().to(torch.bfloat16)
    assert describe(half).unembed_hash != maps.model["unembed_hash"]  # the exact hash sees the dtype...
    scores, _, _ = evaluate_lenses(half, {"mat": MatLens(half, maps)}, batches[:1], progress=False)
    assert scores["mat"]["precision@1"][3] == 1.0 and all(v == v for v in scores["mat"]["kl"])  # ...the check does not
    assert describe(half).unembed_fingerprint != () and maps.model["unembed_fingerprint"]


def test_fingerprint_of_an_unembedding_past_2_24_entries():
    """GPT-2 small's 768 x 50,257 and SmolLM2's 576 x 49,152 unembeddings: float32 linspace rounded
    the last index past the end; the indices are now exact and include both ends."""
    from lensmat.models.identity import _fingerprint

    W = torch.arange(576 * 49152, dtype=torch.float32).reshape(576, 49152) / 1e6
    fp = _fingerprint(W)
    assert fp[0] == 0.0 and fp[-1] == round(float(W[-1, -1]), 6)
    assert fp[5] == round(float(W.reshape(-1)[5 * (W.numel() - 1) // 15]), 6)


@torch.no_grad()
def test_maps_saved_with_the_legacy_fingerprint_still_load_on_another_dtype(tmp_path):
    from lensmat.models.identity import _fingerprint

    model = make_tiny_model()
    stats = collect(model, random_token_batches(2, 4, 10, 40), [resid_hooks(3)], progress=False)[0]
    meta = describe(model).to_dict()
    del meta["fingerprint_version"]
    meta["unembed_fingerprint"] = _fingerprint(model.W_U, legacy=True)  # as lensmat 0.1.0 saved it
    path = io.save_maps(MapSet(fit_layer_maps(stats), meta), tmp_path / "old")
    half = make_tiny_model().to(torch.bfloat16)
    assert list(io.load_maps(path, half).model["unembed_fingerprint"]) == list(meta["unembed_fingerprint"])
    other = make_tiny_model(seed=1).to(torch.bfloat16)
    with pytest.raises(ModelMismatchError, match="unembed"):
        io.load_maps(path, other)
