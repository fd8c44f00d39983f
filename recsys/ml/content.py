"""Content-based similarity of products (item cold start): what a product with no interactions can
be recommended by.

A product is a bag of tokens: its category, each attribute as ``key=value`` (a list gives one
token per element, a nested object ``key.sub=value``) and the words of its name. TF-IDF over
those tokens (binary term frequency, smoothed idf as scikit-learn's ``TfidfVectorizer``), rows
scaled to length 1, so the dot product of two rows is their cosine: a rare attribute two products
share counts more than a category half the catalogue is in.

Two uses, the same at publish and in ``recsys bench cold-start``:

- :func:`similar_by_content`: a product's nearest products by cosine;
- :func:`pick_new_arrivals` and :func:`place_new_arrivals`: for each user, the new products
  nearest to the sum of the vectors of what the user interacted with (weighted as the model's
  matrix weighs it), placed in the last slots of the user's list that no pin holds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

import numpy as np
import scipy.sparse as sp

NAME_WORD = re.compile(r"\w{2,}")
# dense score cells computed at once (rows x catalogue): bounds the memory of a chunk to 64 MB
SCORE_CELLS = 1 << 24


def product_tokens(category: str | None, name: str | None, attributes: Mapping | None) -> set[str]:
    """The tokens a product is described by (see the module's docstring)."""
    tokens = {f"name:{word}" for word in NAME_WORD.findall((name or "").lower())}
    if category is not None:
        tokens.add(f"category={category}")
    tokens.update(_attribute_tokens("", attributes or {}))
    return tokens


def _attribute_tokens(prefix: str, attributes: Mapping) -> Iterable[str]:
    for key, value in attributes.items():
        for element in value if isinstance(value, list) else [value]:
            if isinstance(element, Mapping):
                yield from _attribute_tokens(f"{prefix}{key}.", element)
            elif element is not None:
                # JSON text: true/false/1.5 as the shop wrote them; strings without their quotes
                yield f"{prefix}{key}={element if isinstance(element, str) else json.dumps(element)}"


def tfidf_rows(documents: list[set[str]]) -> sp.csr_matrix:
    """Products x tokens, TF-IDF with rows of length 1 (a product with no token: a zero row)."""
    vocabulary: dict[str, int] = {}
    columns = [vocabulary.setdefault(token, len(vocabulary)) for document in documents for token in sorted(document)]
    indptr = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum([len(document) for document in documents], out=indptr[1:])
    counts = sp.csr_matrix(
        (np.ones(len(columns), np.float32), np.asarray(columns, dtype=np.int64), indptr),
        shape=(len(documents), len(vocabulary)),
    )
    document_frequency = np.bincount(counts.indices, minlength=len(vocabulary))
    idf = np.log((1 + len(documents)) / (1 + document_frequency)) + 1
    weighted = counts.multiply(idf.astype(np.float32)).tocsr()
    return unit_rows(weighted)


def unit_rows(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Rows scaled to length 1 (zero rows stay zero)."""
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ matrix, dtype=np.float32)


def _chunks(rows: int, columns: int) -> Iterable[slice]:
    size = max(1, SCORE_CELLS // max(columns, 1))
    for start in range(0, rows, size):
        yield slice(start, min(start + size, rows))


def _best(scores: np.ndarray, n: int, allowed: np.ndarray) -> np.ndarray:
    """Per row the ``n`` columns of highest score among ``allowed`` (rows x columns, bool), ties
    by lower column; -1 where fewer are allowed."""
    scores = np.where(allowed, scores, -np.inf)
    width = min(n, scores.shape[1])
    if width == 0:
        return np.full((len(scores), n), -1, dtype=np.int32)
    candidates = np.argpartition(-scores, width - 1, axis=1)[:, :width] if width < scores.shape[1] else (
        np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    )
    # a tie at the cut may leave out a lower column of the same score: the columns scoring exactly
    # the cut's score are taken lowest first instead, so the same data always gives the same lists
    cut = np.take_along_axis(scores, candidates, axis=1).min(axis=1, keepdims=True)
    above = scores > cut
    at_cut = (scores == cut) & allowed
    picks = np.full((len(scores), n), -1, dtype=np.int32)
    for row in range(len(scores)):
        better = np.flatnonzero(above[row])
        better = better[np.lexsort((better, -scores[row, better]))]
        tied = np.flatnonzero(at_cut[row])[: width - len(better)]
        chosen = np.concatenate([better, tied])
        picks[row, : len(chosen)] = chosen
    return picks


def similar_by_content(vectors: sp.csr_matrix, owners: np.ndarray, n: int, blocked: np.ndarray) -> np.ndarray:
    """Each owner's ``n`` nearest products by cosine of ``vectors`` (products x tokens, unit
    rows), best first, ties by lower index; never the owner itself, a ``blocked`` product (bool
    per product) or one sharing no token with it. -1 pads a short list."""
    lists = np.full((len(owners), n), -1, dtype=np.int32)
    transposed = vectors.T.tocsc()
    for part in _chunks(len(owners), vectors.shape[0]):
        rows = owners[part]
        scores = (vectors[rows] @ transposed).toarray()
        allowed = (scores > 0) & ~blocked[None, :]
        allowed[np.arange(len(rows)), rows] = False
        lists[part] = _best(scores, n, allowed)
    return lists


def pick_new_arrivals(
    history: sp.csr_matrix, known_vectors: sp.csr_matrix, new_vectors: sp.csr_matrix, k: int,
    blocked: np.ndarray, owned: sp.csr_matrix,
) -> np.ndarray:
    """Per user (rows of ``history``: users x known products, the model's weights), ``k`` new
    products (indices into ``new_vectors``) nearest to the user's interests: the cosine of each
    new product with the weighted sum of the user's products' vectors. Ties, and users whose
    products share no token with any new product, go by lower index. Never a ``blocked`` new
    product (bool per new product) nor one the user ``owned`` (users x new products, e.g. older
    negative feedback); -1 pads when fewer than ``k`` are left."""
    profiles = (history @ known_vectors).tocsr()
    transposed = new_vectors.T.tocsc()
    picks = np.full((history.shape[0], k), -1, dtype=np.int32)
    for part in _chunks(history.shape[0], new_vectors.shape[0]):
        scores = (profiles[part] @ transposed).toarray()
        allowed = ~blocked[None, :] & ~(owned[part].toarray() > 0)
        picks[part] = _best(scores, k, allowed)
    return picks


def place_new_arrivals(lists: np.ndarray, arrivals: np.ndarray, pinned: np.ndarray) -> np.ndarray:
    """``lists`` (rows x n item indices, best first, -1 padded, pins placed) with each row's
    ``arrivals`` (rows x k, -1 padded; items no list holds) in its last slots that no pin holds
    (``pinned``: rows x n, bool). A short list keeps all its items and takes the arrivals after
    them; a row with fewer arrivals keeps more of its own items; no empty slot before an item."""
    out = np.array(lists, copy=True)
    patterns, which = np.unique(pinned, axis=0, return_inverse=True)
    for pattern_index, pattern in enumerate(patterns):
        rows = np.flatnonzero(which.reshape(-1) == pattern_index)
        free = np.flatnonzero(~pattern)
        own, arriving = lists[np.ix_(rows, free)], arrivals[rows]
        # each row's own items up to the free slots its arrivals leave, then its arrivals; valid
        # entries packed to the front, cut to the free slots
        keep = len(free) - (arriving >= 0).sum(axis=1, keepdims=True)
        combined = np.concatenate([np.where(np.arange(len(free)) < keep, own, -1), arriving], axis=1)
        order = np.argsort(combined < 0, axis=1, kind="stable")
        out[np.ix_(rows, free)] = np.take_along_axis(combined, order, axis=1)[:, : len(free)]
    # pins beyond a short list's end close up, as place_pins does
    order = np.argsort(out < 0, axis=1, kind="stable")
    return np.take_along_axis(out, order, axis=1)
