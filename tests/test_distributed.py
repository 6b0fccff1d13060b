"""Two gloo processes give the same maps as one (statistics all-reduced).

Batches of one line and one thread in every process make each line's float32 activations the
same in both runs up to float32 rounding (batch composition and thread count change matmul
blocking by ~1e-7 relative, the model's noise, not the fit's). The tolerances sit a few orders
above that noise and far below any real error: a lost or double-counted line moves the Gram by
~1e-1.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_model, random_token_batches  # noqa: E402

from lensmat.stats.distributed import shutdown  # noqa: E402
from lensmat.stats.fit import fit_layer_maps  # noqa: E402
from lensmat.stats.pipeline import Tokenized, collect_layer_stats  # noqa: E402


def corpus():
    seqs = [b.tokens[i, : int(b.attention_mask[i].sum())].tolist()
            for b in random_token_batches(6, 8, 16, 40, seed=11) for i in range(8)]
    return Tokenized(seqs, "random", "train", 16)


def worker(rank: int, world: int, init_file: str, out: str, pairs: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    stats = collect_layer_stats(make_tiny_model(), corpus(), batch_size=1, pairs=pairs, progress=False)
    maps = fit_layer_maps(stats, all_pairs=pairs == "all")
    if rank == 0:
        torch.save({"n": stats.n, "W": {f"{s}->{t}": m.W.double() for (s, t), m in maps.items()},
                    "panels": stats.panels}, out)
    shutdown()


@pytest.mark.parametrize("pairs", ["all", "to_last"])
def test_two_gloo_ranks_match_one_process(tmp_path, pairs):
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(out), pairs), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stats = collect_layer_stats(make_tiny_model(), corpus(), batch_size=1, pairs=pairs, progress=False)
    finally:
        torch.set_num_threads(threads)
    ref = fit_layer_maps(stats, all_pairs=pairs == "all")
    assert got["n"] == stats.n
    for theirs, ours in zip(got["panels"], stats.panels, strict=True):
        assert float((theirs - ours).norm() / ours.norm()) <= 1e-6
    for (s, t), m in ref.items():
        W = got["W"][f"{s}->{t}"]
        assert float((W - m.W.double()).norm() / m.W.double().norm()) <= 1e-5, (s, t)
