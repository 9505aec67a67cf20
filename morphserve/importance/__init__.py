"""Layer importance: which decoder layers to quantize first.

The engine swaps layers FP16 -> W8/W4 one at a time in a *swap order*, least important first.  This package
measures importance and builds orders:

* :mod:`~morphserve.importance.runner` - the engine's decoder run layer by layer on token windows, any precision
  per layer, without touching the model;
* :mod:`~morphserve.importance.sweep` - many precision configurations evaluated together, sharing common prefixes;
* :mod:`~morphserve.importance.metrics` - LTS, LRS, MDS (and KL), the sensitivity convention and normalisation;
* :mod:`~morphserve.importance.orders` - the swap-order strategies behind one interface (LIS greedy, KL greedy,
  contiguous block, front-to-back, back-to-front, random);
* :mod:`~morphserve.importance.texts` - calibration and evaluation token windows, one per document;
* :mod:`~morphserve.importance.profile` - the profile file (write, read, locate) and :func:`load_order`, which
  falls back to front-to-back when no profile exists;
* :mod:`~morphserve.importance.cli` - ``morphserve profile``.
"""

from morphserve.importance.orders import (STRATEGIES, CalibrationData, OrderResult, OrderStrategy, check_order,
                                          make_strategy)
from morphserve.importance.profile import ProfileError, load_order, profile_path, read_profile, write_profile

__all__ = ["STRATEGIES", "CalibrationData", "OrderResult", "OrderStrategy", "ProfileError", "check_order",
           "load_order", "make_strategy", "profile_path", "read_profile", "write_profile"]
