"""New products (item cold start): active catalogue products with no interaction in the window.

No model of the matrix has a column for them, so no collaborative list can hold them until they
sell. The products table has no creation time, so "new" is exactly that: active, and not one
interaction in the window. The matrix stage writes what publish lists them by:

- ``new_items.parquet``: their ids and categories, sorted by id; in published lists the new
  product ``j`` is catalogue index ``items + j`` (after the matrix's items);
- ``content.npz``: TF-IDF rows (``recsys.ml.content``) of the items, then of the new products;
- ``new_exclude.npz``: users x new products a user gave negative feedback on before the window
  (never listed for them, as ``exclude.npz`` does for the items).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from recsys.core.errors import InputError
from recsys.core.ids import IdType, integer_ids
from recsys.core.layout import CONTENT, ITEMS, NEW_EXCLUDE, NEW_ITEMS
from recsys.ml.content import product_tokens, tfidf_rows


def _column(products: pa.Table, name: str) -> list:
    """A catalogue column as a list; all None where the snapshot has no such column (a catalogue
    written without names or attributes, e.g. by a benchmark)."""
    return products[name].to_pylist() if name in products.column_names else [None] * products.num_rows


def _attributes(text: str | None) -> dict:
    value = json.loads(text) if text else {}
    return value if isinstance(value, dict) else {}  # a JSON array or scalar describes nothing by key


def write_new_products(
    matrix_dir: Path, item_ids: pa.Array, products_path: Path, product_id_type: IdType,
    older_negatives: Callable[[pa.Array], sp.csr_matrix],
) -> int:
    """The new products' files into ``matrix_dir`` (module docstring); returns how many there are.
    ``older_negatives``: users x the given products, 1 where the user gave negative feedback before
    the window (the matrix stage's reading of the extract's pairs).
    With integer product ids, a catalogue id that is not one is left out (it could not be
    published as the shop's other ids are)."""
    products = pq.read_table(products_path)
    catalogue_ids = products["product_id"].cast(pa.string())
    is_new = pc.and_(pc.fill_null(products["active"], False), pc.invert(pc.is_in(catalogue_ids, value_set=item_ids)))
    if product_id_type == "int":
        is_new = pc.and_(is_new, pc.fill_null(integer_ids(catalogue_ids), False))
    new_rows = np.flatnonzero(is_new.to_numpy(zero_copy_only=False))
    new_rows = new_rows[np.argsort(catalogue_ids.take(pa.array(new_rows)).to_numpy(zero_copy_only=False), kind="stable")]
    new_ids = catalogue_ids.take(pa.array(new_rows, pa.int64()))
    categories, names, attributes = (_column(products, name) for name in ("category", "name", "attributes"))
    # the items' catalogue rows (none for an item missing from the catalogue), then the new products'
    item_rows = pc.index_in(item_ids, value_set=catalogue_ids).to_pylist()
    documents = [
        set() if row is None else product_tokens(categories[row], names[row], _attributes(attributes[row]))
        for row in [*item_rows, *new_rows.tolist()]
    ]
    sp.save_npz(matrix_dir / CONTENT, tfidf_rows(documents))
    pq.write_table(
        pa.table({"id": new_ids, "category": pa.array([categories[row] for row in new_rows], pa.string())}),
        matrix_dir / NEW_ITEMS,
    )
    sp.save_npz(matrix_dir / NEW_EXCLUDE, older_negatives(new_ids))
    return len(new_rows)



@dataclass(frozen=True)
class NewProducts:
    """A matrix build's new products as publish reads them."""

    ids: pa.Array  # string ids, sorted
    categories: np.ndarray  # object per new product (None if uncategorised)
    content: sp.csr_matrix  # items' rows, then the new products'
    exclude: sp.csr_matrix  # users x new products

    @property
    def n_items(self) -> int:
        """The matrix's items: new product ``j`` is catalogue index ``n_items + j``."""
        return self.content.shape[0] - len(self.ids)

    @property
    def known_vectors(self) -> sp.csr_matrix:
        return self.content[: self.n_items]

    @property
    def new_vectors(self) -> sp.csr_matrix:
        return self.content[self.n_items :]


def _check_built(matrix_dir: Path) -> None:
    if not (matrix_dir / NEW_EXCLUDE).exists():
        raise InputError(f"{matrix_dir} was built by an older recsys without new products; run its matrix stage again")


def catalogue_ids(matrix_dir: Path) -> pa.Array:
    """Ids of the catalogue indices published lists use: the matrix's items, then the new products."""
    _check_built(matrix_dir)
    return pa.concat_arrays([
        pq.read_table(matrix_dir / name, columns=["id"])["id"].combine_chunks().cast(pa.string())
        for name in (ITEMS, NEW_ITEMS)
    ])


def load_new_products(matrix_dir: Path) -> NewProducts:
    _check_built(matrix_dir)
    table = pq.read_table(matrix_dir / NEW_ITEMS)
    return NewProducts(
        ids=table["id"].combine_chunks().cast(pa.string()),
        categories=table["category"].to_numpy(zero_copy_only=False).astype(object),
        content=sp.load_npz(matrix_dir / CONTENT).tocsr(),
        exclude=sp.load_npz(matrix_dir / NEW_EXCLUDE).tocsr(),
    )
