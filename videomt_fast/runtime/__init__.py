"""The runtime: execution plans, CUDA graphs, sessions and ``optimize()``; it wraps the model.

Importing it registers it with the model layer, whose ``optimize()``, ``new_session()`` and
``new_predictor()`` hand the model to it (the model imports nothing of the runtime).
"""

from videomt_fast.model import modeling as _modeling
from videomt_fast.runtime import fast as _fast

_modeling.register_runtime(_fast)
