"""Deprecated: the preprocess step's old module, kept so that scripts importing it still
run. Use :mod:`volttl.preprocess.step` (the step), :mod:`volttl.preprocess.prepare` (one
study in memory) and :mod:`volttl.preprocess.workers` (the worker processes)."""

from __future__ import annotations

import warnings

from volttl.preprocess.prepare import (  # noqa: F401  (the old names, re-exported)
    INT16_MAX,
    INT16_MIN,
    PreparedStudy,
    prepare_study,
    scan_float_hu,
    source_stamp,
    study_settings,
)
from volttl.preprocess.step import PreprocessSummary, ThrottledIndex  # noqa: F401
from volttl.preprocess.step import preprocess_step as preprocess  # noqa: F401
from volttl.preprocess.workers import POOL_START_METHOD, process_study, run_isolated  # noqa: F401

warnings.warn("volttl.preprocess.run is renamed: import preprocess_step from volttl.preprocess.step "
              "(and prepare_study from volttl.preprocess.prepare)", DeprecationWarning, stacklevel=2)
