"""Knowledge distillation into a student `size_ratio` the teacher's size."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from greenstack.compression.distill import (
    build_student,
    check_teacher,
    frozen_copy,
    kd_term,
    lm_kd_term,
    load_teacher,
    plan_student,
)
from greenstack.compression.selection import count_parameters
from greenstack.engine.events import Event
from greenstack.engine.policy import Policy, Role
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import ConfigError, Problem, above, between, checked
from greenstack.models.spec import num_labels
from greenstack.policies.compression._common import init_window, replace_model
from greenstack.provenance import Figure
from greenstack.tasks.base import forward

log = logging.getLogger("greenstack")
NAME = "compression.distill"


class Distillation(Policy):
    """Trains a student on `alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * cross-entropy`.

    Classification: KL of the per-sample class distributions. Causal LM (task=causal_lm): KL of the
    next-token distributions at every position with a target (the task's ignore_index masks padding),
    averaged per token, plus the task's next-token loss; the student is the decoder with fewer layers
    and/or a narrower width (same family, built from the teacher's config, same vocabulary).

    Teacher: `null` = the run's own model, trained until `start` and then frozen (e.g. model=minilm
    fine-tunes the shipped all-MiniLM-L6-v2 first); or a greenstack run directory, a transformers
    classifier directory, or a `.safetensors` file described by `teacher_model` (used from step 0).
    Student: `student` (a model node such as {name: resnet10t}) or, by default, the teacher's
    architecture shrunk to at most `size_ratio` of its parameters. `student_lr_scale` multiplies
    the learning rate for the new model (a freshly initialised student usually wants more than a
    fine-tuning rate). Label spaces are compared at INIT, before any step.
    """

    role = Role.MODIFIER

    audit_kind = "compression"

    events = frozenset({Event.INIT, Event.BATCH_START, Event.AFTER_FORWARD, Event.FIT_END})

    @checked(NAME)
    def __init__(self, teacher: str | None = None, teacher_model: dict[str, Any] | None = None,
                 size_ratio: Annotated[float, between(0, 1, low_open=True, fix="the student's share of the teacher's "
                                                                                "parameters, e.g. 0.3")] = 0.3,
                 student: dict[str, Any] | None = None, temperature: Annotated[float, above(0)] = 4.0,
                 alpha: Annotated[float, between(0, 1, fix="weight of the soft-target term (1 - alpha goes to the "
                                                           "labels)")] = 0.5,
                 student_lr_scale: Annotated[float, above(0)] = 1.0, init_from_teacher: bool = True,
                 start: str | int | None = None, end: str | int | None = None) -> None:
        problems: list[Problem] = []
        init_window(self, NAME, start, end, problems)
        if teacher is None:
            if self.start is None or self.start.value == 0:
                problems.append(Problem(f"{NAME}.start", start, "with teacher: null the run's own model is the "
                                        "teacher, so it must train before distillation starts",
                                        'set start, e.g. "0.5dur", or give a trained teacher'))
        else:
            problems += check_teacher(str(teacher), f"{NAME}.teacher")
        if student is not None and not any(k in student for k in ("name", "path", "config")):
            problems.append(Problem(f"{NAME}.student", student, "needs `name` (timm), `path` or `config` "
                                    "(transformers)"))
        if problems:
            raise ConfigError(problems)
        self.teacher_ref, self.teacher_model_node = teacher, teacher_model
        self.size_ratio, self.student_node = float(size_ratio), student
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.student_lr_scale, self.init_from_teacher = float(student_lr_scale), init_from_teacher
        self.teacher: nn.Module | None = None
        self.swapped_at: int | None = None
        self.teacher_params = self.student_params = 0
        self.results: dict[str, Any] = {}

    def handles(self, event: Event, state: State) -> bool:
        if event is Event.BATCH_START:
            return self.swapped_at is None and state.step >= self._start_step
        return super().handles(event, state)

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if event is Event.INIT:
            self._init(state)
        elif event is Event.BATCH_START:
            self._swap(state, frozen_copy(state.model))
        elif event is Event.AFTER_FORWARD and self.teacher is not None and state.loss is not None:
            with torch.no_grad():
                teacher_logits = forward(self.teacher, state.batch)
            logits, labels = state.outputs, state.batch["labels"]
            task = state.task
            if getattr(task, "target", "class") == "next_token":  # causal LM: per-token distributions
                hard = task.loss(logits, state.batch)
                soft = lm_kd_term(logits, teacher_logits, labels, self.temperature,
                                  getattr(task, "ignore_index", -100))
            else:
                hard = F.cross_entropy(logits.float(), labels)
                soft = kd_term(logits, teacher_logits, self.temperature)
            # re-weight the loop's cross-entropy part; terms other policies added stay as they are
            state.loss = state.loss + self.alpha * (soft - hard)
        elif event is Event.FIT_END and self.teacher is not None and state.evaluate is not None:
            teacher = state.evaluate(self.teacher, "test")
            student = state.evaluate(state.model, "test")
            for metric in ("accuracy", "perplexity"):
                if f"test/{metric}" in teacher and f"test/{metric}" in student:
                    self.results = {"metric": metric, "teacher": teacher[f"test/{metric}"],
                                    "student": student[f"test/{metric}"]}

    def _init(self, state: State) -> None:
        if self.teacher_ref is None:
            # dry run on the meta device: an impossible size_ratio fails now, not halfway through the run
            spec, n_student, n_teacher = plan_student(state.model, self.size_ratio) if self.student_node is None \
                else ({}, 0, count_parameters(state.model))
            log.info("distill: the run's model (%s parameters) trains until step %d, then teaches a student%s",
                     f"{n_teacher:,}", self._start_step, f" of {n_student:,} parameters" if n_student else "")
            return
        if self.swapped_at is not None and self.teacher is not None:
            return
        classes = num_labels(state.model)
        if classes is None:
            raise ConfigError(Problem(f"{NAME}.teacher", self.teacher_ref, "cannot tell this run's label space"))
        in_chans = next((m.in_channels for m in state.model.modules() if isinstance(m, nn.Conv2d)), 3)
        teacher = load_teacher(str(self.teacher_ref), num_classes=classes, in_chans=in_chans,
                               teacher_model=self.teacher_model_node)
        self._swap(state, teacher)

    def _swap(self, state: State, teacher: nn.Module) -> None:
        teacher_labels, run_labels = num_labels(teacher), num_labels(state.model)
        if teacher_labels is not None and run_labels is not None and teacher_labels != run_labels:
            raise ConfigError(Problem(f"{NAME}.teacher", self.teacher_ref, f"label spaces differ: the teacher "
                                      f"predicts {teacher_labels} classes, this run's data has {run_labels}",
                                      "distil from a teacher trained on the same labels"))
        self.teacher = teacher.to(state.device).eval()
        student = build_student(self.teacher, self.size_ratio, student=self.student_node,
                                init_from_teacher=self.init_from_teacher)
        student_labels = num_labels(student)
        if student_labels is not None and run_labels is not None and student_labels != run_labels:
            raise ConfigError(Problem(f"{NAME}.student", self.student_node, f"student predicts {student_labels} "
                                      f"classes, this run's data has {run_labels}"))
        if self.student_lr_scale != 1.0 and state.optim_factory is not None:
            # through the factory, so a later rebuild (e.g. QAT preparing the student) keeps the scale
            state.optim_factory = _scaled_factory(state.optim_factory, self.student_lr_scale)
        replace_model(state, student)
        state.model.train()
        self.teacher_params, self.student_params = count_parameters(self.teacher), count_parameters(student)
        self.swapped_at = state.step
        log.info("distill: student with %s parameters (%.1f%% of the teacher's %s) from step %d, T=%g, alpha=%g",
                 f"{self.student_params:,}", 100 * self.student_params / max(1, self.teacher_params),
                 f"{self.teacher_params:,}", state.step, self.temperature, self.alpha)

    def state_dict(self) -> dict[str, Any]:
        """An external teacher is rebuilt from `teacher` at INIT; a self-distilled one (the run's own model
        at the swap) exists nowhere else, so its weights travel with the checkpoint."""
        out: dict[str, Any] = {"swapped_at": self.swapped_at}
        if self.teacher_ref is None and self.teacher is not None:
            out["teacher"] = {k: v.detach() for k, v in self.teacher.state_dict().items()}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.swapped_at = state.get("swapped_at")
        self._saved_teacher = state.get("teacher")

    def restore_model(self, state: State) -> None:
        """Checkpoint hook: a snapshot taken after a self-distillation swap holds the student; rebuild the
        teacher (the run's model, with its saved weights) and the student before the weights are loaded."""
        saved, self._saved_teacher = getattr(self, "_saved_teacher", None), None
        if self.swapped_at is None or self.teacher is not None or saved is None:
            return
        teacher = frozen_copy(state.model)
        teacher.load_state_dict(saved)
        at = self.swapped_at
        self._swap(state, teacher)
        self.swapped_at = at

    def summary(self) -> dict[str, Any]:
        if not self.student_params:
            return {}
        source = f"{NAME}: parameter counts of student and teacher"
        figures: dict[str, Any] = {
            "compression/distill_student_parameters": Figure(self.student_params, "count", "measured", source),
            "compression/distill_teacher_parameters": Figure(self.teacher_params, "count", "measured", source),
            "compression/distill_param_fraction": Figure(round(self.student_params / self.teacher_params, 6),
                                                         "fraction", "measured", source),
        }
        if self.results.get("metric") == "perplexity":
            src = f"{NAME}: evaluation of teacher and student on the test split"
            figures["compression/distill_teacher_perplexity"] = Figure(round(self.results["teacher"], 6), "perplexity",
                                                                       "measured", src)
            figures["compression/distill_student_perplexity"] = Figure(round(self.results["student"], 6), "perplexity",
                                                                       "measured", src)
        elif self.results:
            src = f"{NAME}: evaluation of teacher and student on the test split"
            figures["compression/distill_teacher_accuracy"] = Figure(self.results["teacher"], "fraction", "measured", src)
            figures["compression/distill_student_accuracy"] = Figure(self.results["student"], "fraction", "measured", src)
            if self.results["teacher"] > 0:
                figures["compression/distill_accuracy_retained"] = Figure(
                    round(self.results["student"] / self.results["teacher"], 6), "fraction", "measured", src)
        return figures


def _scaled_factory(factory: Callable[[Iterable[nn.Parameter]], tuple[Any, Any]], scale: float
                    ) -> Callable[[Iterable[nn.Parameter]], tuple[Any, Any]]:
    """An optimizer factory whose learning rates (and the schedule's base rates) are `scale` times larger."""

    def build(params: Iterable[nn.Parameter]) -> tuple[Any, Any]:
        optimizer, scheduler = factory(params)
        for group in optimizer.param_groups:
            group["lr"] *= scale
            if "initial_lr" in group:
                group["initial_lr"] *= scale
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * scale for lr in scheduler.base_lrs]
        return optimizer, scheduler

    return build


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
