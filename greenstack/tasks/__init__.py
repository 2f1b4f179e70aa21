"""Tasks for the `task` config group: what a run optimises and how it is scored.

A task owns three things the loop used to hard-code: how a batch becomes model outputs, the training
loss, and the evaluation metrics. Pick one with `task=classification | causal_lm | regression`, or
your own class by `_target_` (subclass `Task`).
"""

from greenstack.tasks.base import Evaluator, Task, model_outputs
from greenstack.tasks.causal_lm import CausalLM
from greenstack.tasks.classification import Classification
from greenstack.tasks.regression import Regression

__all__ = ["CausalLM", "Classification", "Evaluator", "Regression", "Task", "model_outputs"]
