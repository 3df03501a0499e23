"""The search: MetaSchedule's evolutionary search over a group of tasks, with graphopt's cost model
(not trained before it can predict), search space (RewriteLayout guarded) and progress callback.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .logs import tune_contexts
from .workers import run_secs

if TYPE_CHECKING:
    from .interrupt import Interrupt
    from .records import Progress
    from .summary import TuningSummary

__all__ = ["search"]


def search(ms, tasks, keys, labels, quota, options, database_dir, db, builder, runner, workers, bar, progress,
           summary, interrupt) -> None:
    """MetaSchedule's evolutionary search over `tasks`, `quota` new trials each, records into `db`.

    The tune contexts log through metaschedule_logs (tune_contexts), not MetaSchedule's logging.config set-up,
    which fails on a handler without a name."""
    strategy = ms.search_strategy.EvolutionarySearch(population_size=options.population,
                                                     init_min_unmeasured=min(50, options.population))
    with tune_contexts(tasks, database_dir, space=_search_space(ms, tasks[0]), strategy=strategy,
                       num_threads=workers, seed=options.seed) as (contexts, weights):
        callback = _progress_callback(bar, tasks, keys, labels, progress, summary, interrupt)
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(database_dir),
            max_trials_global=quota * len(tasks), max_trials_per_task=quota,
            num_trials_per_iter=min(options.trials_per_iter, quota),
            builder=builder, runner=runner, database=db, cost_model=_cost_model(workers),
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), callback])


def _progress_callback(bar, tasks, keys, labels, progress: Progress, summary: TuningSummary,
                       interrupt: Interrupt | None = None):
    from tvm.s_tir import meta_schedule as ms
    from tvm.ir.utils import derived_object

    best: dict[int, float] = {}

    @derived_object
    class GraphoptProgress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            n = len(measure_candidates)
            summary.new_trials += n
            for res in runner_results:
                secs = run_secs(res)
                if secs is not None and secs < best.get(task_id, float("inf")):
                    best[task_id] = secs
            entry = progress.get(keys[task_id])
            entry["searched"] = int(entry.get("searched", 0)) + n
            entry["name"] = tasks[task_id].task_name
            progress.save()
            if bar is not None:
                b = best.get(task_id)
                bar.update(n)
                bar.set_description_str(f"{labels[task_id]} {tasks[task_id].task_name[:28]}")
                bar.set_postfix_str(f"best {b * 1e3:.4f} ms" if b is not None else "no valid candidate yet")
            if interrupt is not None and interrupt.requested:     # this round's records are committed: stop
                raise KeyboardInterrupt("graphopt: tuning interrupted")

    return GraphoptProgress()


def _cost_model(workers: int):
    """MetaSchedule's XGBoost cost model (as tune_tasks makes it), trained only once it is used.

    XGBModel predicts random scores until it has `num_warmup_samples` (100) measurements, yet retrains after
    every round (~3-6 s each here, plus ~2 s to import xgboost): with budgets below 100 trials per tuning run
    all of that was wasted. The search is the same; only the unused training is skipped."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.cost_model import XGBModel

    @derived_object
    class GraphoptXGBModel(XGBModel._cls):
        def _train(self, xs, ys):
            if self.data_size < self.num_warmup_samples:
                self.last_train_size = 0        # train at the first update that reaches the warm-up size
                return
            super()._train(xs, ys)

    return GraphoptXGBModel(num_tuning_cores=workers, tree_method="auto")


def _search_space(ms, task):
    """MetaSchedule's default search space for the target (its schedule rules, postprocessors and mutators),
    with RewriteLayout guarded (_guarded_rewrite_layout)."""
    probe = ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
                           task_name="graphopt-space")
    space = probe.space_generator
    postprocs = [_guarded_rewrite_layout(p) if type(p).__name__ == "RewriteLayout" else p for p in space.postprocs]
    return ms.space_generator.PostOrderApply(sch_rules=list(space.sch_rules), postprocs=postprocs,
                                             mutator_probs=dict(space.mutator_probs))


def _repacks_weights(sch) -> bool:
    """Whether a schedule already repacks a weight itself (graphopt's default schedules do: a TransformLayout
    of a cache-read weight; MetaSchedule's own candidates only get one from RewriteLayout)."""
    trace = sch.trace
    if trace is None:
        return False
    return any(inst.kind.name == "TransformLayout" for inst in trace.insts)


def _guarded_rewrite_layout(inner):
    """MetaSchedule's RewriteLayout postprocessor, except on schedules that already repack their weights.

    The default schedule of each kernel is committed as its first record, so the evolutionary search replays
    it with the postprocessors. TVM 0.27's RewriteLayout fails a check on a weight already repacked
    (`args.size() == initial_indices_orig.size()`) and that error would abort the whole search; such a
    schedule needs no layout rewrite. Any other failure of RewriteLayout drops that one candidate."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class GraphoptRewriteLayout(ms.postproc.PyPostproc):
        def __init__(self, wrapped):
            super().__init__()
            self.wrapped = wrapped

        def _initialize_with_tune_context(self, context) -> None:
            self.wrapped._initialize_with_tune_context(context)

        def apply(self, sch) -> bool:
            if _repacks_weights(sch):
                return True
            try:
                return bool(self.wrapped.apply(sch))
            except Exception:
                return False

        def clone(self):
            return GraphoptRewriteLayout(self.wrapped.clone())

    return GraphoptRewriteLayout(inner)
