"""normkit for Keras 3: Switchable Normalization and its tools on the JAX, TensorFlow and PyTorch backends.

An optional extra (``pip install normkit[keras]``); ``import normkit`` never imports Keras.
Everything here is written with ``keras.ops``, so one implementation serves every backend;
the conventions are Keras' (``axis=-1``, momentum = weight of the old value), see
``docs/KERAS.md``.
"""

try:
    import keras as _keras
except ModuleNotFoundError as _err:
    if _err.name != "keras":  # Keras is there but its backend is not: say which one to pick
        raise ImportError(
            f"normkit.keras: Keras is installed but cannot load its backend ({_err}); set "
            "KERAS_BACKEND to an installed backend (jax, torch or tensorflow)"
        ) from None
    raise ImportError(
        "normkit.keras needs Keras 3, which is not installed: pip install normkit[keras]"
    ) from None

if int(_keras.__version__.split(".")[0]) < 3:
    raise ImportError(
        f"normkit.keras needs Keras 3 (one layer on JAX, TensorFlow and PyTorch), found Keras "
        f"{_keras.__version__}: pip install normkit[keras]"
    )

from normkit.keras._importance import importance_report, plot_importance  # noqa: E402
from normkit.keras._stats import RecomputeStats, recompute_stats  # noqa: E402
from normkit.keras._switchnorm import SwitchNormalization  # noqa: E402
from normkit.keras._ws import WeightStandardization, WSConv1D, WSConv2D, WSConv3D, standardize_kernel  # noqa: E402

__all__ = [
    "SwitchNormalization",
    "recompute_stats",
    "RecomputeStats",
    "WSConv1D",
    "WSConv2D",
    "WSConv3D",
    "WeightStandardization",
    "standardize_kernel",
    "importance_report",
    "plot_importance",
]
