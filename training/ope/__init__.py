"""Off-policy evaluation in the Open Bandit Pipeline's vocabulary."""

from training.ope.bootstrap import bootstrap_interval
from training.ope.estimators import (
    ESTIMATORS,
    DirectMethod,
    DoublyRobust,
    InverseProbabilityWeighting,
    OffPolicyEstimator,
    SelfNormalizedInverseProbabilityWeighting,
    SwitchDoublyRobust,
)
from training.ope.inputs import OpeInputError, UndefinedEstimateError, check_ope_inputs

__all__ = [
    "ESTIMATORS",
    "DirectMethod",
    "DoublyRobust",
    "InverseProbabilityWeighting",
    "OffPolicyEstimator",
    "OpeInputError",
    "SelfNormalizedInverseProbabilityWeighting",
    "SwitchDoublyRobust",
    "UndefinedEstimateError",
    "bootstrap_interval",
    "check_ope_inputs",
]
