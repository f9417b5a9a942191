"""Volumetric few-shot evaluation: protocols, the shared slice inferer, Dice accounting and reports."""

from fsmis_monai.evaluation.evaluator import FewShotEvaluator, evaluate
from fsmis_monai.evaluation.inferer import FewShotSliceInferer, SupportBoundSegmenter
from fsmis_monai.evaluation.metrics import CaseResult, summarize_cases
from fsmis_monai.evaluation.protocols import PROTOCOLS, ProtocolPlan, make_plan
from fsmis_monai.evaluation.runner import build_model, run_evaluation

__all__ = ["FewShotEvaluator", "evaluate", "FewShotSliceInferer", "SupportBoundSegmenter", "CaseResult",
           "summarize_cases", "PROTOCOLS", "ProtocolPlan", "make_plan", "build_model", "run_evaluation"]
