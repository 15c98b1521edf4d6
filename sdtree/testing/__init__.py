"""Testing kit for sdtree users: hypothesis strategies and a diffing equality assertion.

Importing it needs ``hypothesis`` (``pip install sdtree[test]``).
"""

from sdtree.testing.assertions import assert_state_dict_equal
from sdtree.testing.strategies import (
    DTYPES,
    fqns,
    fusable_state_dicts,
    optimizer_state_dicts,
    stackable_state_dicts,
    state_dicts,
    tensors,
)

__all__ = [
    "assert_state_dict_equal",
    "fqns",
    "tensors",
    "state_dicts",
    "optimizer_state_dicts",
    "fusable_state_dicts",
    "stackable_state_dicts",
    "DTYPES",
]
