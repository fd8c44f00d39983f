"""Model families behind one interface (the shape of implicit's ``RecommenderBase``): fit on the
weighted user × item CSR, top-N lists with exclusions, similar items, a user vector for a new row
of events (fold-in), saved and loaded as one npz holding the arrays and a JSON description.

Every family ranks through ``recsys.ml.top_n.rank_lists``: its scores are a product of a user
vector and item vectors. For ALS and BPR those are the factors. For the item-item families the
user vector is the user's row of the matrix and the item vectors the columns of the item-item
matrix (score = X_u · S[:, i] = EASE's X·B or item-kNN's X·S), kept dense: those families are for
catalogues of up to ``DENSE_ITEMS_LIMIT`` items and refuse larger ones with one line. A blend is
the concatenation of its two parts' vectors, each user's part scaled by weight / the standard
deviation of that part's scores over the catalogue: a per-user z-scored score fusion (the mean
shift is the same for every item of a user, so it cannot change a list).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import scipy.sparse as sp

from recsys.core.errors import InputError
from recsys.core.params import MODEL_FAMILIES
from recsys.ml.explain import Explanation

if TYPE_CHECKING:  # top_n loads numba: the train stage fits without it
    from recsys.ml.top_n import ItemVectors

# item × item arrays in float32: 20k items is 1.6 GB per array, about what a worker can hold twice
DENSE_ITEMS_LIMIT = 20_000
USER_CHUNK = 4_096  # users whose dense rows are built at once (bounds memory for item-item families)
STORED_ROWS_BLOCK = 4_096  # rows StoredRows maps at once for an index array (at most a page each)
FAMILIES = MODEL_FAMILIES


def single_blas_thread():
    from threadpoolctl import threadpool_limits

    # one BLAS thread: the same sums in the same order on every run (and implicit asks for it)
    return threadpool_limits(limits=1, user_api="blas")


def _check_dense(family: str, n_items: int) -> None:
    if n_items > DENSE_ITEMS_LIMIT:
        raise InputError(
            f"{family} keeps an items x items matrix: {n_items} items is over its limit of {DENSE_ITEMS_LIMIT}; "
            "leave it out of models for this shop"
        )


class Recommender(ABC):
    """A fitted (or fittable) model of one family."""

    family: ClassVar[str]

    @abstractmethod
    def fit(self, user_items: sp.csr_matrix, seed: int = 42) -> Recommender:
        """Fit on the weighted user × item matrix; returns self."""

    @property
    @abstractmethod
    def items(self) -> ItemVectors:
        """The item vectors ranking multiplies user vectors by."""

    @abstractmethod
    def user_vectors(self, users: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
        """(len(users), dims) vectors of rows ``users``; ``user_items`` is the matrix the model
        was fitted on (the item-item families read the users' rows from it)."""

    @abstractmethod
    def fold_in(self, row: sp.csr_matrix) -> np.ndarray | None:
        """The vector of a user not in the fitted matrix from a 1 × items weighted row, or None
        when the family cannot compute one (BPR: no closed-form user solve)."""

    def params(self) -> dict[str, Any]:
        """Hyperparameters, as saved: the family's dataclass fields shown in its repr (the fitted
        arrays are not)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.repr}

    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """What is saved besides the params."""

    @classmethod
    @abstractmethod
    def restore(cls, params: dict[str, Any], arrays: dict[str, np.ndarray], parts: list[Recommender]) -> Recommender:
        """The model again from its params and arrays (and parts, for a blend)."""

    @property
    def n_items(self) -> int:
        return len(self.items.factors)

    def recommend(
        self,
        users: np.ndarray,
        user_items: sp.csr_matrix,
        n: int,
        *,
        exclude: sp.csr_matrix | None = None,
        blocked: np.ndarray | None = None,
        diversity_lambda: float = 0.0,
    ) -> np.ndarray:
        """Top ``n`` item indices for ``users`` (rows of ``user_items``), -1 padded: ``exclude``
        (one row per user of ``users``) and ``blocked`` (bool per item) never listed."""
        from recsys.ml.top_n import rank_lists

        users = np.asarray(users, dtype=np.int64)
        lists = np.full((len(users), n), -1, dtype=np.int32)
        items = self.items
        for start in range(0, len(users), USER_CHUNK):
            part = slice(start, min(start + USER_CHUNK, len(users)))
            lists[part] = rank_lists(
                self.user_vectors(users[part], user_items), items, n,
                exclude=None if exclude is None else exclude[part], blocked=blocked, diversity_lambda=diversity_lambda,
            )
        return lists

    def similar_items(
        self, queries: np.ndarray, n: int, blocked: np.ndarray | None = None, progress: str | None = None
    ) -> np.ndarray:
        """The ``n`` items most similar to each query item, best first, -1 padded (never the item
        itself nor a ``blocked`` one): the cosine of the item vectors (the item-item families
        override it with their own matrix)."""
        from recsys.ml.top_n import similar_items as cosine_similar_items

        return cosine_similar_items(self.items, queries, n, blocked, progress=progress)

    def save(self, path: Path) -> None:
        """One npz: the arrays, and the family and params as a JSON string (no pickle)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = _flat_arrays(self)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, model=np.array(json.dumps(_description(self))), **arrays)
        tmp.replace(path)


def _description(model: Recommender) -> dict:
    description = {"family": model.family, "params": model.params()}
    if isinstance(model, Blend):
        description["parts"] = [_description(part) for part in model.parts]
    return description


def _flat_arrays(model: Recommender, prefix: str = "") -> dict[str, np.ndarray]:
    arrays = {f"{prefix}{name}": array for name, array in model.arrays().items()}
    if isinstance(model, Blend):
        for index, part in enumerate(model.parts):
            arrays.update(_flat_arrays(part, f"{prefix}part{index}/"))
    return arrays


def load_model(path: Path, with_users: bool = True, users_on_disk: bool = False) -> Recommender:
    """A model saved by ``Recommender.save``; an npz of bare factors (saved before families) is ALS.
    ``with_users`` False: user factors (most of a factor model's file) are left unread, for work
    on the items alone (the npz reads each array on access). ``users_on_disk``: user factors
    are ``StoredRows``, read a block of users at a time (publish's pass over every user)."""
    with np.load(path, allow_pickle=False) as saved:
        arrays = {
            name: StoredRows(path, name) if users_on_disk and name.endswith("user_factors") else saved[name]
            for name in saved.files if with_users or not name.endswith("user_factors")
        }
    if "model" not in arrays:
        return Als.restore(Als().params(), arrays, [])
    return _restore(json.loads(str(arrays.pop("model"))), arrays)


class StoredRows:
    """A 2-d array inside an npz, its rows read from the file when indexed (``[lo:hi]`` or an
    index array), never all at once: a pass over every user's factors holds a block of them.
    ``np.savez`` stores its arrays uncompressed, one contiguous C-order .npy each."""

    def __init__(self, path: Path, name: str) -> None:
        import struct
        import zipfile

        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise InputError(f"{path}: {name} is compressed; StoredRows reads uncompressed arrays (np.savez)")
        with open(path, "rb") as file:
            file.seek(info.header_offset)
            local = file.read(30)  # a zip local file header: its name and extra field lengths end it
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            file.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(file)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(file)
            self.data_offset = file.tell()
        if fortran_order or len(shape) != 2:
            raise InputError(f"{path}: {name} is not a C-order 2-d array")
        self.path, self.shape, self.dtype = path, shape, dtype
        self.row_bytes = shape[1] * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        if isinstance(index, slice):
            lo, hi, step = index.indices(self.shape[0])
            if step != 1:
                raise IndexError("StoredRows reads ranges of rows, step 1")
            return self._rows(lo, max(lo, hi))
        rows = np.asarray(index, dtype=np.int64)
        taken = np.empty((len(rows), self.shape[1]), self.dtype)
        # through a mapping of the file, STORED_ROWS_BLOCK rows at a time: the pages a block
        # touches leave the process with its mapping (a whole range of rows may be far longer)
        for first in range(0, len(rows), STORED_ROWS_BLOCK):
            mapped = np.memmap(self.path, self.dtype, "r", self.data_offset, self.shape)
            taken[first : first + STORED_ROWS_BLOCK] = mapped[rows[first : first + STORED_ROWS_BLOCK]]
            del mapped
        return taken

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        with open(self.path, "rb") as file:
            file.seek(self.data_offset + lo * self.row_bytes)
            return np.fromfile(file, self.dtype, (hi - lo) * self.shape[1]).reshape(hi - lo, self.shape[1])


def _restore(description: dict, arrays: dict[str, np.ndarray], prefix: str = "") -> Recommender:
    parts = [
        _restore(part, arrays, f"{prefix}part{index}/") for index, part in enumerate(description.get("parts", []))
    ]
    own = {name[len(prefix):]: array for name, array in arrays.items() if name.startswith(prefix) and "/" not in name[len(prefix):]}
    return FAMILY_CLASSES[description["family"]].restore(description["params"], own, parts)


def _dense_rows(matrix: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
    return matrix[users].toarray().astype(np.float32, copy=False)


class FactorModel(Recommender):
    """A family whose users and items are factor vectors (``user_factors``, ``item_factors``)."""

    user_factors: np.ndarray | None
    item_factors: np.ndarray | None

    @property
    def items(self) -> ItemVectors:
        if "_items" not in self.__dict__:
            from recsys.ml.top_n import ItemVectors

            self.__dict__["_items"] = ItemVectors.of(self.item_factors)
        return self.__dict__["_items"]

    def user_vectors(self, users: np.ndarray, user_items: sp.csr_matrix | None) -> np.ndarray:
        return self.user_factors[np.asarray(users, dtype=np.int64)]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"user_factors": self.user_factors, "item_factors": self.item_factors}

    @classmethod
    def restore(cls, params, arrays, parts) -> FactorModel:
        return cls(**params, user_factors=arrays.get("user_factors"), item_factors=arrays["item_factors"])


# ---------------------------------------------------------------------------------------- ALS


@dataclass
class Als(FactorModel):
    """implicit's ALS (Hu, Koren & Volinsky 2008) on the matrix as given (scaled upstream)."""

    factors: int = 64
    regularization: float = 40.0
    alpha: float = 4.0
    iterations: int = 15
    user_factors: np.ndarray | None = field(default=None, repr=False)
    item_factors: np.ndarray | None = field(default=None, repr=False)
    family: ClassVar[str] = "als"

    def fit(self, user_items: sp.csr_matrix, seed: int = 42) -> Als:
        from recsys.ml.als import fit_als

        self.user_factors, self.item_factors = fit_als(
            user_items, self.factors, self.regularization, self.alpha, self.iterations, seed
        )
        self.__dict__.pop("_items", None)
        return self

    def implicit_model(self):
        """implicit's ALS around the factors (its fold-in solves the same least squares)."""
        from recsys.ml.ranking import als_model

        model = als_model(self.user_factors, self.item_factors)
        model.regularization, model.alpha = self.regularization, self.alpha
        return model

    def fold_in(self, row: sp.csr_matrix) -> np.ndarray | None:
        model = self.__dict__.get("_implicit")
        if model is None:
            model = self.__dict__["_implicit"] = self.implicit_model()
            model.num_threads = 1
        return np.asarray(model.recalculate_user(0, row.tocsr()), dtype=np.float32)



# ---------------------------------------------------------------------------------------- BPR


@dataclass
class Bpr(FactorModel):
    """implicit's BPR (Rendle et al. 2009), on one thread: its Hogwild updates on several threads
    would make every fit different."""

    factors: int = 64
    learning_rate: float = 0.05
    regularization: float = 0.01
    iterations: int = 100
    user_factors: np.ndarray | None = field(default=None, repr=False)
    item_factors: np.ndarray | None = field(default=None, repr=False)
    family: ClassVar[str] = "bpr"

    def fit(self, user_items: sp.csr_matrix, seed: int = 42) -> Bpr:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        with single_blas_thread():
            model = BayesianPersonalizedRanking(
                factors=self.factors, learning_rate=self.learning_rate, regularization=self.regularization,
                iterations=self.iterations, num_threads=1, random_state=seed,
            )
            model.fit(user_items.tocsr().astype(np.float32, copy=False), show_progress=False)
        # implicit adds a bias column (items: the bias, users: 1), so the product includes it
        self.user_factors, self.item_factors = np.asarray(model.user_factors), np.asarray(model.item_factors)
        self.__dict__.pop("_items", None)
        return self

    def fold_in(self, row: sp.csr_matrix) -> np.ndarray | None:
        return None



# ------------------------------------------------------------------------------ item-item families


class _ItemItem(Recommender):
    """Score = the user's (transformed) row · a column of an items × items matrix S."""

    binary: bool
    matrix: np.ndarray | None  # S, items × items, float32

    def _rows(self, user_items: sp.csr_matrix) -> sp.csr_matrix:
        """The user rows as the model reads them: 1 per interaction if ``binary``, else the weights."""
        rows = user_items.tocsr().astype(np.float32)
        if self.binary:
            rows.data[:] = 1.0
        return rows

    @property
    def items(self) -> ItemVectors:
        if "_items" not in self.__dict__:
            from recsys.ml.top_n import ItemVectors

            self.__dict__["_items"] = ItemVectors.of(self.matrix.T)
        return self.__dict__["_items"]

    def user_vectors(self, users: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
        return _dense_rows(self._rows(user_items[np.asarray(users, dtype=np.int64)]), np.arange(len(users)))

    def fold_in(self, row: sp.csr_matrix) -> np.ndarray | None:
        return self._rows(row).toarray()[0]

    def similar_items(
        self, queries: np.ndarray, n: int, blocked: np.ndarray | None = None, progress: str | None = None
    ) -> np.ndarray:
        """The list of a user who has only the query item: row q of S, ranked by ``rank_lists``."""
        from recsys.ml.top_n import rank_lists

        queries = np.asarray(queries, dtype=np.int64)
        one_hot = np.zeros((len(queries), self.n_items), dtype=np.float32)
        one_hot[np.arange(len(queries)), queries] = 1.0
        itself = sp.csr_matrix(
            (np.ones(len(queries), np.float32), queries, np.arange(len(queries) + 1)), shape=(len(queries), self.n_items)
        )
        return rank_lists(one_hot, self.items, n, exclude=itself, blocked=blocked, progress=progress)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"matrix": self.matrix}

    def explain(self, row: sp.csr_matrix, items: list[int], n: int = 3) -> list[Explanation]:
        """Each item's score from ``row`` and the ``n`` past items whose terms r_j · S[j, i] add
        most to it (the score is exactly their sum)."""
        row = self._rows(row)
        past, weights = row.indices, row.data.astype(np.float64)
        explanations = []
        for item in items:
            parts = weights * self.matrix[past, item].astype(np.float64)
            top = np.argsort(-parts, kind="stable")[:n]
            explanations.append(Explanation(int(item), float(parts.sum()),
                                            [(int(past[j]), float(parts[j])) for j in top]))
        return explanations


@dataclass
class Ease(_ItemItem):
    """EASE (Steck 2019): B = I − P / diag(P) with P = (XᵀX + λI)⁻¹, the diagonal zero."""

    regularization: float = 300.0
    binary: bool = True
    matrix: np.ndarray | None = field(default=None, repr=False)
    family: ClassVar[str] = "ease"

    def fit(self, user_items: sp.csr_matrix, seed: int = 42) -> Ease:
        _check_dense(self.family, user_items.shape[1])
        rows = self._rows(user_items)
        with single_blas_thread():
            gram = (rows.T @ rows).toarray().astype(np.float64)
            gram[np.diag_indices_from(gram)] += self.regularization
            inverse = np.linalg.inv(gram)
        weights = -inverse / np.diag(inverse)
        np.fill_diagonal(weights, 0.0)
        self.matrix = weights.astype(np.float32)
        self.__dict__.pop("_items", None)
        return self

    @classmethod
    def restore(cls, params, arrays, parts) -> Ease:
        return cls(**params, matrix=arrays["matrix"])


@dataclass
class ItemKnn(_ItemItem):
    """implicit's item-item nearest neighbours: the ``neighbours`` most similar items per item by
    ``similarity`` (cosine, or bm25 with its k1 and b), scored X·S as implicit does."""

    similarity: str = "bm25"
    neighbours: int = 100
    bm25_k1: float = 1.2
    bm25_b: float = 0.75
    binary: bool = False
    matrix: np.ndarray | None = field(default=None, repr=False)
    family: ClassVar[str] = "item_knn"

    def fit(self, user_items: sp.csr_matrix, seed: int = 42) -> ItemKnn:
        from implicit.nearest_neighbours import ItemItemRecommender, bm25_weight, normalize

        _check_dense(self.family, user_items.shape[1])
        rows = self._rows(user_items)
        # the weighting of implicit's BM25Recommender / CosineRecommender, handed on as CSR: theirs
        # passes a COO matrix, which implicit converts again with a warning
        if self.similarity == "bm25":
            weighted = bm25_weight(rows.T, self.bm25_k1, self.bm25_b).T
        elif self.similarity == "cosine":
            weighted = normalize(rows.T).T
        else:
            raise InputError(f"item_knn similarity must be cosine or bm25, got {self.similarity!r}")
        model = ItemItemRecommender(K=self.neighbours, num_threads=1)
        model.fit(weighted.tocsr(), show_progress=False)
        self.matrix = model.similarity.toarray().astype(np.float32)
        self.__dict__.pop("_items", None)
        return self

    @classmethod
    def restore(cls, params, arrays, parts) -> ItemKnn:
        return cls(**params, matrix=arrays["matrix"])


# -------------------------------------------------------------------------------------- blend


@dataclass
class Blend(Recommender):
    """weight × z(first's scores) + (1 − weight) × z(second's scores), z per user over the catalogue."""

    parts: list[Recommender] = field(default_factory=list)
    weight: float = 0.5
    family: ClassVar[str] = "blend"

    def fit(self, user_items: sp.csr_matrix, seed: int = 42) -> Blend:
        for part in self.parts:
            part.fit(user_items, seed)
        self.__dict__.pop("_items", None)
        self.__dict__.pop("_covariances", None)
        return self

    @property
    def items(self) -> ItemVectors:
        if "_items" not in self.__dict__:
            from recsys.ml.top_n import ItemVectors

            self.__dict__["_items"] = ItemVectors.of(np.hstack([part.items.factors for part in self.parts]))
        return self.__dict__["_items"]

    def _combined(self, vectors: list[np.ndarray]) -> np.ndarray:
        combined = []
        for part_vectors, weight, covariance in zip(
            vectors, (self.weight, 1.0 - self.weight), self._item_covariances, strict=True
        ):
            # the sd of a user's scores over the catalogue is sqrt(v' C v), C the covariance of the
            # item vectors. einsum without optimisation loops row by row in a fixed order: the same
            # scale for a user whatever the batch (a matrix product rounds by its shape), so a
            # list on request is the published one
            user_vectors = part_vectors.astype(np.float64)
            variance = np.einsum("ij,jk,ik->i", user_vectors, covariance, user_vectors, optimize=False)
            spread = np.sqrt(np.maximum(variance, 0.0))
            scale = np.where(spread > 0, weight / np.maximum(spread, 1e-30), 0.0).astype(np.float32)
            combined.append(part_vectors * scale[:, None])
        return np.hstack(combined)

    @property
    def _item_covariances(self) -> list[np.ndarray]:
        if "_covariances" not in self.__dict__:
            self.__dict__["_covariances"] = [
                np.atleast_2d(np.cov(part.items.factors.astype(np.float64), rowvar=False, bias=True))
                for part in self.parts
            ]
        return self.__dict__["_covariances"]

    def user_vectors(self, users: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
        return self._combined([part.user_vectors(users, user_items) for part in self.parts])

    def fold_in(self, row: sp.csr_matrix) -> np.ndarray | None:
        vectors = [part.fold_in(row) for part in self.parts]
        if any(vector is None for vector in vectors):
            return None
        return self._combined([np.asarray(vector, np.float32).reshape(1, -1) for vector in vectors])[0]

    def similar_items(
        self, queries: np.ndarray, n: int, blocked: np.ndarray | None = None, progress: str | None = None
    ) -> np.ndarray:
        """The similar items of the part with the larger weight."""
        return self.parts[0 if self.weight >= 0.5 else 1].similar_items(queries, n, blocked, progress)

    def params(self) -> dict[str, Any]:
        return {"weight": self.weight}

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def restore(cls, params, arrays, parts) -> Blend:
        return cls(parts=parts, **params)


# a family in a module of its own imports this one for Recommender: registered after it is defined
from recsys.ml.autoencoder import MultDae  # noqa: E402

FAMILY_CLASSES: dict[str, type[Recommender]] = {
    "als": Als, "bpr": Bpr, "item_knn": ItemKnn, "ease": Ease, "mult_dae": MultDae, "blend": Blend,
}


def make(family: str, **params) -> Recommender:
    """An unfitted model of ``family`` with ``params`` (the family's defaults for the rest)."""
    if family not in FAMILY_CLASSES or family == "blend":
        raise InputError(f"unknown model family {family!r}; known: {', '.join(f for f in FAMILIES if f != 'blend')}")
    known = FAMILY_CLASSES[family]().params()
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InputError(f"unknown {family} params: {', '.join(unknown)}; known: {', '.join(known)}")
    return FAMILY_CLASSES[family](**params)


def describe(model: Recommender) -> dict:
    """Family and params (a blend: its weight and its parts'), as reports and meta record them."""
    return _description(model)


