"""New products in what publish writes (item cold start; ``recsys.pipeline.new_products``).

- Similar products: a new product gets its nearest products by content (category, attributes,
  name; ``recsys.ml.content``) among the active products the rules allow, new or not. A product
  of the window keeps its collaborative list; only a list the model leaves short (every other
  product blocked but a few) is filled up with content neighbours it does not hold yet. Blending
  content into full collaborative lists was not done: where a product has interactions, they say
  more than its description, and the published lists stay as they were.
- User lists: with ``new_arrival_slots`` = k, each user's last k slots that no pin holds go to k
  new products nearest to what the user interacted with, never one an exclude rule of the user's
  segments keeps out, inactive, or one the user gave negative feedback on.

In published lists the new product ``j`` is catalogue index ``items + j``: the lists' member
tokens are the items' ids followed by the new products'
(``recsys.pipeline.new_products.catalogue_ids``).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recsys.core.rules import RuleSnapshot
from recsys.ml.content import pick_new_arrivals, place_new_arrivals, similar_by_content
from recsys.ml.merchandising import Merchandising
from recsys.pipeline.new_products import NewProducts


def new_merchandising(rules: RuleSnapshot, new: NewProducts) -> Merchandising:
    """The rules compiled against the new products (their exclusions and the inactive ones)."""
    return Merchandising(rules, new.ids.to_pylist(), new.categories)


def with_content_similar(
    new: NewProducts, rules: RuleSnapshot, owners: np.ndarray, lists: np.ndarray, blocked_items: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(owners, lists) of the similar products with the new products' content lists after the
    items' ``lists`` (of item indices ``owners``), short item lists filled up by content.
    ``blocked_items``: item indices kept out of every list. Catalogue indices throughout."""
    n = lists.shape[1]
    blocked = np.concatenate([np.zeros(new.n_items, dtype=bool), new_merchandising(rules, new).for_segments(frozenset()).blocked])
    blocked[blocked_items] = True
    new_owners = np.arange(new.n_items, new.n_items + len(new.ids), dtype=np.int32)
    short = np.flatnonzero(lists[:, -1] < 0)
    # a short list's own members are left out of its content neighbours: at most n of them
    fill = similar_by_content(new.content, np.concatenate([owners[short], new_owners]).astype(np.int32), 2 * n, blocked)
    filled = lists.copy()
    for row, neighbours in zip(short, fill[: len(short)], strict=True):
        held = filled[row][filled[row] >= 0]
        extra = [item for item in neighbours if item >= 0 and item not in held][: n - len(held)]
        filled[row, len(held) : len(held) + len(extra)] = extra
    return np.concatenate([owners, new_owners]).astype(np.int32), np.concatenate([filled, fill[len(short) :, :n]])


def with_new_arrivals(
    rules: RuleSnapshot, merchandising: Merchandising, new: NewProducts, history: sp.csr_matrix, users: np.ndarray,
    user_ids: list[str], lists: np.ndarray, k: int,
) -> np.ndarray:
    """``lists`` (users x top-N item indices, pins placed) with ``k`` new products each in the
    last slots no pin holds (module docstring). ``history``: users x items, the weights the model
    was fitted on; ``merchandising``: the rules compiled against the items (for the pins)."""
    arriving = new_merchandising(rules, new)
    groups: dict[frozenset[str], list[int]] = {}
    for row, user_id in enumerate(user_ids):
        groups.setdefault(merchandising.segments_of(user_id) if merchandising.segment_names else frozenset(), []).append(row)
    out = lists.copy()
    for segments, rows in groups.items():
        group = users[rows]
        picks = pick_new_arrivals(
            history[group], new.known_vectors, new.new_vectors, k, arriving.for_segments(segments).blocked,
            new.exclude[group],
        )
        pins = [pin.item for pin in merchandising.for_segments(segments).pins]
        pinned = np.isin(lists[rows], pins) if pins else np.zeros((len(rows), lists.shape[1]), dtype=bool)
        out[rows] = place_new_arrivals(lists[rows], np.where(picks >= 0, picks + new.n_items, -1), pinned)
    return out
