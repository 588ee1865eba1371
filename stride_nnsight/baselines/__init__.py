"""Baselines that return the same `Attribution` as STRIDE (``scores [n_queries, n_train]``,
positive = proponent): BM25, representation similarity, gradient dot/cosine (TracIn at one
checkpoint), TRAK (one model or an ensemble) and EK-FAC (kronfluence). See docs/baselines.md. Contamination
baselines from the model alone (loss, Min-K% probability, zlib ratio): `membership_scores`.

    from stride_nnsight import baselines
    attr = baselines.bm25(train_texts, prompts, completions)
    attr = baselines.gradient_similarity(model, train_texts, prompts, completions, normalize=True)
"""

from .ekfac import conv1d_to_linear, ekfac, linear_module_names
from .gradients import GaussianProjection, example_gradients, gradient_similarity, trak, trak_features, trak_scores
from .lexical import bm25, word_tokenize
from .membership import MEMBERSHIP_METHODS, membership_scores, token_logprobs
from .representation import pooled_representations, representation_similarity

__all__ = [
    "bm25",
    "word_tokenize",
    "representation_similarity",
    "pooled_representations",
    "gradient_similarity",
    "trak",
    "trak_features",
    "trak_scores",
    "example_gradients",
    "GaussianProjection",
    "ekfac",
    "conv1d_to_linear",
    "linear_module_names",
    "membership_scores",
    "token_logprobs",
    "MEMBERSHIP_METHODS",
]
