"""Scoring sampled completions with OpenAI-style graders inside the trainer (imports only domain)."""

from posttrain.trainer.grading.judge import JudgePool
from posttrain.trainer.grading.sandbox import SandboxLimits, SandboxUnavailable
from posttrain.trainer.grading.scoring import GradeResult, score, score_batch

__all__ = ["GradeResult", "JudgePool", "SandboxLimits", "SandboxUnavailable", "score", "score_batch"]
