"""stride-nnsight: STRIDE training data attribution for nnsight and TransformerLens.

    from stride_nnsight import Stride
    stride = Stride(model, layer=2).fit(train_texts)
    attr = stride.attribute(prompts, completions)    # Attribution: scores [query, train]
"""

__version__ = "0.1.0"

from .arguments import StrideArguments  # noqa: E402
from .design import SubsetDesign, recommended_n_subsets  # noqa: E402
from .operators import SteeringOperators  # noqa: E402
from .results import Attribution, AttributionCache  # noqa: E402
from .fitting import CheckpointMismatchError  # noqa: E402
from .storage import StateFileError  # noqa: E402
from .stride import PartialFitError, Stride, attribute_layers  # noqa: E402

__all__ = [
    "Attribution",
    "AttributionCache",
    "attribute_layers",
    "CheckpointMismatchError",
    "PartialFitError",
    "StateFileError",
    "Stride",
    "StrideArguments",
    "SteeringOperators",
    "SubsetDesign",
    "recommended_n_subsets",
    "__version__",
]
