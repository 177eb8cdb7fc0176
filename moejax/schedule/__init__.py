"""Performance model and policy search (docs/design.md §3-§4): op prices, MoE-Lightning's
HRM reproduction, moejax's own prediction, the policy search, the simulator and the
generic timeline runner. Imports no model code: the schedule is data."""

from moejax.schedule.continuous import (ContinuousPrediction, predict_continuous,
                                        search_continuous)
from moejax.schedule.hrm import (MoELightningResult, moe_lightning_evaluate,
                                 moe_lightning_search)
from moejax.schedule.policy import Policy
from moejax.schedule.predict import MoELensBound, Prediction, moe_lens_bound, predict
from moejax.schedule.search import search_policy

__all__ = ["predict", "search_policy", "Policy", "Prediction", "MoELensBound",
           "moe_lens_bound", "moe_lightning_evaluate", "moe_lightning_search",
           "MoELightningResult", "predict_continuous", "search_continuous",
           "ContinuousPrediction"]
