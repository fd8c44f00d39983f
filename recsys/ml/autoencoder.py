"""Mult-DAE (Liang, Krishnan, Hoffman & Jebara 2018, "Variational Autoencoders for Collaborative
Filtering"): a denoising autoencoder of each user's row with a multinomial likelihood, in numpy.

A user's row r (its confidence weights, or 1 per interaction if ``binary``) is scaled to length
1 (x), half its entries dropped at random while training, and encoded to h = tanh(x W + b); the
scores are h · V + c, trained so that softmax(h V + c) puts its mass on the user's items in
proportion to r (the loss: −Σ r_i log softmax_i, plus ``l2`` × the squared weights), by Adam on
mini-batches. The scores are a product of a user vector [h, 1] and item vectors [V_i, c_i], so
ranking goes through ``rank_lists`` like every family; a user's vector is a function of their
row alone, so a new user folds in exactly.

Deterministic: the batches and dropout masks come from one seeded generator, and the fit runs
on one BLAS thread (the same sums in the same order on every run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import scipy.sparse as sp

from recsys.core.errors import InputError
from recsys.ml.families import Recommender, single_blas_thread

if TYPE_CHECKING:
    from recsys.ml.top_n import ItemVectors

ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-8
# every epoch reads each user's row as a dense vector over the catalogue: the fit's time grows
# with users x items x epochs (82 s for 10,000 x 2,000 with the defaults on the 2-core machine,
# docs/benchmarks.md), so a daily run refuses shops whose fit would take hours
DENSE_CELLS_LIMIT = 100_000_000


def _unit_input(rows: sp.csr_matrix, binary: bool) -> sp.csr_matrix:
    """The rows as the encoder reads them: 1 per interaction if ``binary``, each of length 1 (an
    empty row stays 0). Sparse: a sparse × dense product sums each row's terms in the row's own
    order, so a user's vector is the same alone (the API) as in a batch (publish)."""
    rows = rows.tocsr().astype(np.float32, copy=True)
    rows.sum_duplicates()
    if binary:
        rows.data[:] = 1.0
    norms = np.sqrt(np.asarray(rows.multiply(rows).sum(axis=1), dtype=np.float64).ravel())
    counts = np.diff(rows.indptr)
    rows.data /= np.repeat(np.where(norms > 0, norms, 1.0), counts).astype(np.float32)
    return rows


@dataclass
class MultDae(Recommender):
    """Mult-DAE with one tanh layer of ``latent`` units between the items and the scores."""

    latent: int = 100
    epochs: int = 100
    batch_size: int = 100
    learning_rate: float = 1e-3
    l2: float = 0.01
    keep: float = 0.5  # share of a row's entries kept by the input dropout while training
    # the row's confidence weights (what the run gives every family), not 1 per interaction: four
    # validation splits of MovieLens preferred them (docs/quality.md#tried-for-the-bivae--5--target)
    binary: bool = False
    encoder: np.ndarray | None = field(default=None, repr=False)  # items × latent
    encoder_bias: np.ndarray | None = field(default=None, repr=False)
    decoder: np.ndarray | None = field(default=None, repr=False)  # latent × items
    decoder_bias: np.ndarray | None = field(default=None, repr=False)
    family: ClassVar[str] = "mult_dae"

    def fit(self, user_items: sp.csr_matrix, seed: int = 42) -> MultDae:
        n_users, n_items = user_items.shape
        if n_users * n_items > DENSE_CELLS_LIMIT:
            raise InputError(
                f"mult_dae trains on dense rows of users x items: {n_users:,} x {n_items:,} is over its limit of "
                f"{DENSE_CELLS_LIMIT:,} cells (its fit would take hours); leave it out of models for this shop"
            )
        with single_blas_thread():
            self._train(user_items.tocsr(), np.random.default_rng(seed))
        self.__dict__.pop("_items", None)
        return self

    def _train(self, user_items: sp.csr_matrix, rng: np.random.Generator) -> None:
        n_users, n_items = user_items.shape
        weights = [_glorot(rng, n_items, self.latent), _glorot(rng, self.latent, n_items)]
        biases = [rng.normal(0.0, 1e-3, self.latent).astype(np.float32), rng.normal(0.0, 1e-3, n_items).astype(np.float32)]
        parameters = weights + biases
        first_moments = [np.zeros_like(p) for p in parameters]
        second_moments = [np.zeros_like(p) for p in parameters]
        (beta1, beta2), step = ADAM_BETAS, 0
        inputs = _unit_input(user_items, self.binary)
        targets = user_items.astype(np.float32, copy=True)
        if self.binary:
            targets.data[:] = 1.0
        for _ in range(self.epochs):
            order = rng.permutation(n_users)
            for start in range(0, n_users, self.batch_size):
                batch = order[start:start + self.batch_size]
                kept = (rng.random((len(batch), n_items)) < self.keep).astype(np.float32) / self.keep
                gradients = self._gradients(inputs[batch].toarray() * kept, targets[batch].toarray(), *parameters)
                step += 1
                rate = self.learning_rate * np.sqrt(1 - beta2**step) / (1 - beta1**step)
                for parameter, gradient, first, second in zip(
                    parameters, gradients, first_moments, second_moments, strict=True
                ):
                    first *= beta1
                    first += (1 - beta1) * gradient
                    second *= beta2
                    second += (1 - beta2) * gradient * gradient
                    parameter -= (rate * first / (np.sqrt(second) + ADAM_EPSILON)).astype(np.float32)
        self.encoder, self.decoder, self.encoder_bias, self.decoder_bias = parameters

    def _gradients(self, noisy, targets, encoder, decoder, encoder_bias, decoder_bias) -> list[np.ndarray]:
        """Gradients of the mean multinomial loss over the batch plus ``l2`` / 2 × Σ w² (weights
        only), in the order encoder, decoder, encoder_bias, decoder_bias."""
        hidden = np.tanh(noisy @ encoder + encoder_bias)
        logits = hidden @ decoder + decoder_bias
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        batch = len(targets)
        d_logits = (probabilities * targets.sum(axis=1, keepdims=True) - targets) / batch
        d_hidden = (d_logits @ decoder.T) * (1.0 - hidden * hidden)
        return [
            noisy.T @ d_hidden + self.l2 * encoder,
            hidden.T @ d_logits + self.l2 * decoder,
            d_hidden.sum(axis=0),
            d_logits.sum(axis=0),
        ]

    def loss(self, user_items: sp.csr_matrix) -> float:
        """The training objective without dropout (what ``_gradients`` differentiates, for tests)."""
        targets = user_items.tocsr().astype(np.float32).toarray()
        if self.binary:
            targets = (targets > 0).astype(np.float32)
        hidden = np.tanh(_unit_input(user_items, self.binary).toarray().astype(np.float64) @ self.encoder + self.encoder_bias)
        logits = hidden @ self.decoder + self.decoder_bias
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        penalty = 0.5 * self.l2 * (np.sum(self.encoder.astype(np.float64) ** 2) + np.sum(self.decoder.astype(np.float64) ** 2))
        return float(-(targets * log_softmax).sum() / len(targets) + penalty)

    @property
    def items(self) -> ItemVectors:
        if "_items" not in self.__dict__:
            from recsys.ml.top_n import ItemVectors

            self.__dict__["_items"] = ItemVectors.of(np.hstack([self.decoder.T, self.decoder_bias[:, None]]))
        return self.__dict__["_items"]

    def _encode(self, rows: sp.csr_matrix) -> np.ndarray:
        hidden = np.tanh(_unit_input(rows, self.binary) @ self.encoder + self.encoder_bias)
        return np.hstack([hidden, np.ones((len(hidden), 1), np.float32)]).astype(np.float32)

    def user_vectors(self, users: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
        return self._encode(user_items.tocsr()[np.asarray(users, dtype=np.int64)])

    def fold_in(self, row: sp.csr_matrix) -> np.ndarray | None:
        return self._encode(row)[0]

    def similar_items(
        self, queries: np.ndarray, n: int, blocked: np.ndarray | None = None, progress: str | None = None
    ) -> np.ndarray:
        """The cosine of the decoder's item vectors (without the bias, which is popularity)."""
        from recsys.ml.top_n import ItemVectors
        from recsys.ml.top_n import similar_items as cosine_similar_items

        return cosine_similar_items(ItemVectors.of(self.decoder.T), queries, n, blocked, progress=progress)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"encoder": self.encoder, "encoder_bias": self.encoder_bias,
                "decoder": self.decoder, "decoder_bias": self.decoder_bias}

    @classmethod
    def restore(cls, params, arrays, parts) -> MultDae:
        return cls(**params, **{name: arrays[name] for name in ("encoder", "encoder_bias", "decoder", "decoder_bias")})


def _glorot(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32)
