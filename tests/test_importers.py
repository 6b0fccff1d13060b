"""Importing the paper's pickled matrices: tensors only, nothing executed."""

import io
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from lensmat.stats import artifacts as lm_io
from lensmat.lenses.importers import UnsafePickleError, import_paper_maps, load_tensor_pickle


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_imports_tensor_numpy_and_torch_save_files(tmp_path):
    model = make_tiny_model(n_layers=3, d_model=16)
    g = torch.Generator().manual_seed(0)
    A = {k: torch.randn(16, 16, generator=g) for k in ("0_3", "1_3", "2_3", "1_2")}
    pickle.dump(A["0_3"], open(tmp_path / "0_3.pickle", "wb"))
    pickle.dump(A["1_3"].numpy(), open(tmp_path / "1_3.pickle", "wb"))
    torch.save(A["2_3"], tmp_path / "2_3.pickle")
    pickle.dump(A["1_2"], open(tmp_path / "1_2.pickle", "wb"))
    maps = import_paper_maps(tmp_path, model)
    assert maps.provenance["source"] == "imported" and len(maps.maps) == 4
    assert maps.provenance["scoring"] == {"positions": "one-random", "bos": False}  # how the authors fitted them
    m = maps.get("blocks.0.hook_resid_post", "blocks.2.hook_resid_post")
    assert torch.equal(m.W, A["1_3"].T)  # y = A x  ->  W = Aᵀ for row vectors
    x = torch.randn(5, 16)
    assert torch.allclose(m(x), (A["1_3"] @ x.T).T, atol=1e-5)
    saved = lm_io.save_maps(maps, tmp_path / "out")
    assert lm_io.load_maps(saved, model).provenance["source"] == "imported"


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "0_3.pickle"
    evil.write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(UnsafePickleError, match="posix.system|os.system|nt.system"):
        load_tensor_pickle(evil)
    with pytest.raises(UnsafePickleError):
        import_paper_maps(tmp_path, make_tiny_model(n_layers=3, d_model=16))
    assert not marker.exists()


def test_malicious_payload_inside_tensor_bytes_is_refused(tmp_path):
    """A pickled tensor carries its bytes through torch.storage._load_from_bytes, which would call
    torch.load(weights_only=False); the importer reads those bytes with weights_only=True instead."""
    marker = tmp_path / "pwned2"
    payload = io.BytesIO()
    torch.save(Evil(marker), payload, _use_new_zipfile_serialization=False)

    class Smuggler:
        def __reduce__(self):
            import torch.storage

            return (torch.storage._load_from_bytes, (payload.getvalue(),))

    path = tmp_path / "0_1.pickle"
    path.write_bytes(pickle.dumps(Smuggler()))
    with pytest.raises(pickle.UnpicklingError):
        load_tensor_pickle(path)
    assert not marker.exists()


def test_wrong_shape_and_layer_are_named(tmp_path):
    model = make_tiny_model(n_layers=3, d_model=16)
    pickle.dump(np.zeros((8, 8), dtype=np.float32), open(tmp_path / "0_1.pickle", "wb"))
    with pytest.raises(ValueError, match="16x16"):
        import_paper_maps(tmp_path, model)
    (tmp_path / "0_1.pickle").unlink()
    pickle.dump(torch.zeros(16, 16), open(tmp_path / "2_7.pickle", "wb"))
    with pytest.raises(ValueError, match="outside 0..3"):
        import_paper_maps(tmp_path, model)
