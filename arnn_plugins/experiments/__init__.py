"""Applications on top of the library: the demo, the paper reproduction, pictures, benchmarks.

==============  ===============================================================
``recipes``     :class:`Scale`, :data:`SCALES` and the demo's and configs' sizes,
                :func:`pan_config`, :func:`run_pan`
``reproduce``   :func:`reproduce` (paper Tables 1, 2, the inverse task),
                :func:`format_tables` (the query-blind and uniform-mask levels
                they print are :mod:`arnn_plugins.data`'s)
``demo``        the main job, ``arnn-plugins demo`` (outline fill and PAN on
                MBG^inv, three seeds)
``outline``     the outline-fill task (also ``arnn-plugins demo --outline``)
``pan_study``   PAN's attention measured along training for any setting,
                ``python -m arnn_plugins.experiments.pan_study``
``pictures``    mask pictures (``arnn-plugins show``, the demo's PNG)
``plots``       training curves, what ``a[i, j]`` depends on (``arnn-plugins plot``)
``bench``       speed and memory tables, ``arnn-plugins bench``
==============  ===============================================================
"""

from .recipes import (
    CONFIG_SCALE,
    DEMO_SCALES,
    INVERSE_KINDS,
    KIND_NAMES,
    SCALES,
    TABLE1_KINDS,
    Scale,
    pan_config,
    run_pan,
)
from ..data import query_blind_accuracy, uniform_mask_correctness
from .reproduce import format_tables, reproduce

__all__ = [
    "CONFIG_SCALE",
    "DEMO_SCALES",
    "INVERSE_KINDS",
    "KIND_NAMES",
    "SCALES",
    "TABLE1_KINDS",
    "Scale",
    "format_tables",
    "pan_config",
    "query_blind_accuracy",
    "reproduce",
    "run_pan",
    "uniform_mask_correctness",
]
