"""The engine under the sweep and the search: `SharedStudy` owns an Optuna study on shared storage and its
MLflow parent run, from opening to closing; `Plan` is what a study is for (the sweep's grid, the search's
space): what a trial is and what the parent reports.

Any number of workers (the processes of one command with `--jobs N`, or commands started on other
machines) that share the storage and the tracking server work on one study and log under one parent run,
whose id lives in the study. The process that creates the study (Optuna's `create_study` lets one win)
checks nothing is there, creates the parent run and queues the study's first trials; the others wait until
the study names its parent. Trials are taken from Optuna's queue of waiting trials (`enqueue_trial`) or,
with the queue empty, from the sampler. A trial whose worker is lost is failed and queued again by another
(its heartbeats: `storage`); a worker with nothing left to start stays while other trials run, to notice
such a loss and run the retry, so that the last worker standing finishes the study. A command's own workers
are processes on this machine (`workers`) or tasks on a Ray cluster (`cluster`); both run `run_job`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import optuna
from optuna.trial import TrialState

from ..errors import FmnistError
from ..schema import (ATTR_HOLDS, ATTR_PARENT, ATTR_RULES, KIND_CONFIRM, KIND_LAUNCHER, KIND_SWEEP_CHILD, KIND_TRIAL, TAG_KIND,
                      TAG_PARENT, TAG_STUDY, TAG_TRIAL)
from ..tracking.connection import tracking_uri
from ..tracking.launcher import inside_mlflow_run
from ..tracking.queries import child_runs
from ..tracking.runs import create_run, end_run_as
from ..tracking.runs import run as open_run
from ..urls import redact
from . import workers
from .storage import (WAIT_POLL_S, StorageError, check_parent, check_rules, delete_half_made, heartbeat_interval, open_storage,
                      retried, study_tag, wait_until_ready)
from ..training.hardware import worker_gpus
from .workers import Budget

ORPHAN_REASON = ("orphaned: found RUNNING when its study resumed, with its trial already ended (its process "
                 "lost the tracking server, or was killed before heartbeats could tell)")


class WorkerError(FmnistError, RuntimeError):
    """A `--jobs` worker process ended with an error (its runs say why)."""


@dataclass(frozen=True)
class Hooks:
    """What a command shows while its trials run; all optional (worker processes print their own lines)."""

    on_start: Optional[Callable] = None  # (k, n, config, elapsed s, eta s or None, label): a point starts
    progress: Optional[Callable] = None  # (trial, config) -> (on_epoch_end, on_batch) for its run
    on_trial_end: Optional[Callable] = None  # (FrozenTrial)
    on_wait: Optional[Callable[[int], None]] = None  # (trials other workers are running)
    on_workers: Optional[Callable[[int], None]] = None  # (worker processes about to start)
    on_lost: Optional[Callable[[int], None]] = None  # (workers lost to a signal whose work the others redid)
    on_raced: Optional[Callable] = None  # (config, reason, label): a point is skipped, its config raced out


class Plan(Protocol):
    """What a study is for; picklable, as it travels to `--jobs` worker processes."""

    kind: str  # the parent run's kind (schema.KIND_SWEEP, KIND_SEARCH)
    name: str  # the parent run's name
    parent_id: Optional[str]  # the parent run when it exists already (a search's, for its confirm); else None:
    #                           the process that creates the study creates it
    direction: str  # "maximize" or "minimize"
    metric: str  # what a trial's value is (a key of training.config.SELECT), named in Optuna's dashboard
    device: str  # where its trials train ("cpu", "cuda"): several GPUs get a worker each
    catch: tuple  # exceptions that fail one trial, not the worker

    @property
    def holds(self) -> str: ...  # what the study holds (a grid's or a space's digest): workers must agree

    @property
    def rules(self) -> dict: ...  # how trials are judged ({"pruner": .., "sampler": ..}; {"race": ..}): kept

    def parent_params(self) -> dict: ...

    def parent_tags(self) -> dict: ...

    def sampler(self, worker: int, finished_before: int) -> optuna.samplers.BaseSampler: ...

    def pruner(self) -> optuna.pruners.BasePruner: ...

    def fill(self, study: optuna.Study, experiment_id: str) -> Any: ...  # a new study's first queued trials

    def more(self, study: optuna.Study) -> bool: ...  # start another trial (if the command's budget allows)?

    def callbacks(self) -> list: ...  # Optuna callbacks after each trial (the search's stopping rule)

    def objective(self, shared: "SharedStudy", data, hooks: Hooks) -> Callable: ...

    def report(self, shared: "SharedStudy") -> Any: ...  # inside the parent run: summarize, log, return


@dataclass(frozen=True)
class Job:
    """What one `--jobs` worker process needs to join an open study (all picklable)."""

    plan: Any  # a Plan
    storage_url: str
    study_name: str
    experiment_id: str
    parent_id: str
    data_dir: Optional[str]
    subset: int
    worker: int  # 0, 1, ...: its sampler seed differs from the other workers'
    budget: Any = None  # trials the command's workers start in all, a workers.Budget (or, for Ray tasks,
    #                     a cluster.ClusterBudget); None: until the plan says stop
    timeout: Optional[float] = None  # seconds after which it starts none


@dataclass
class SharedStudy:
    """One study and its parent run, from open to close. `open` creates or joins the study, `run` works on
    it (in this process or in worker processes), `close` reaps lost runs and has the plan report."""

    plan: Any  # a Plan
    storage_url: str
    study_name: str
    experiment_id: str
    study: optuna.Study
    parent_id: str
    heartbeats: bool  # whether lost workers can be told (not on a journal file)
    finished_before: int  # trials that had ended when this process opened the study
    completed_before: int  # trials that had completed then
    filled: Any = None  # what `plan.fill` returned, when this process created the study

    @property
    def tag(self) -> str:
        """The value of TAG_STUDY on the parent and on every trial's run."""
        return study_tag(self.storage_url, self.study_name)

    @classmethod
    def open(cls, plan, storage_url: str, study_name: str, experiment_id: str) -> "SharedStudy":
        """Create the study (this process wins `create_study`: it creates the parent run and fills the
        queue) or join it (wait until it names its parent, check it holds this plan and logs to this
        experiment); then end the runs an earlier attempt left orphaned."""
        storage, heartbeats = open_storage(storage_url)
        sampler, pruner, where = plan.sampler(0, 0), plan.pruner(), f"study {study_name!r} in {redact(storage_url)}"
        filled = None
        try:
            study = optuna.create_study(storage=storage, study_name=study_name, direction=plan.direction,
                                        sampler=sampler, pruner=pruner)
            try:
                study.set_user_attr(ATTR_HOLDS, plan.holds)
                study.set_metric_names([plan.metric])
                study.set_user_attr(ATTR_RULES, plan.rules)
                parent_id = plan.parent_id or create_run(
                    plan.name, kind=plan.kind, tags={TAG_STUDY: study_tag(storage_url, study_name), **plan.parent_tags()},
                    params=plan.parent_params(), experiment_id=experiment_id)
                filled = plan.fill(study, experiment_id)
                study.set_user_attr(ATTR_PARENT, parent_id)  # last: the study is ready for the others
            except BaseException:
                # A study that never named its parent would make the next command wait for it and fail:
                # a failed start leaves nothing behind but its FAILED parent run (if it got that far).
                delete_half_made(study_name, storage)
                raise
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(storage=storage, study_name=study_name, sampler=sampler, pruner=pruner)
            if study.direction.name.lower() != plan.direction:
                raise StorageError(f"{where} is to {study.direction.name.lower()}, this command would "
                                   f"{plan.direction}; give another --study") from None
            parent_id = wait_until_ready(study, where)
            held = study.user_attrs.get(ATTR_HOLDS)
            if held != plan.holds:
                raise StorageError(f"{where} holds {held or 'a study of an older fmnist-mlflow'}, not {plan.holds}: "
                                   "every worker needs the same file and options; give another --study") from None
            check_rules(study, plan.rules, where)
            check_parent(study, parent_id, experiment_id)
            if inside_mlflow_run():
                create_run(plan.name, kind=KIND_LAUNCHER, tags={TAG_STUDY: study_tag(storage_url, study_name),
                                    TAG_PARENT: parent_id}, params={"study": study_name})
        states = [t.state for t in study.get_trials(deepcopy=False)]
        shared = cls(plan, storage_url, study_name, experiment_id, study, parent_id, heartbeats,
                     sum(s.is_finished() for s in states), states.count(TrialState.COMPLETE), filled)
        shared.reap_orphans()
        return shared

    @classmethod
    def join(cls, job: Job) -> "SharedStudy":
        """A worker process's view of a study its command opened."""
        storage, heartbeats = open_storage(job.storage_url)
        study = optuna.load_study(storage=storage, study_name=job.study_name, pruner=job.plan.pruner(),
                                  sampler=job.plan.sampler(job.worker, 0))
        states = [t.state for t in study.get_trials(deepcopy=False)]
        finished = sum(s.is_finished() for s in states)
        if finished:  # a resumed study: a fresh seed, so that this worker does not replay earlier suggestions
            study.sampler = job.plan.sampler(job.worker, finished)
        return cls(job.plan, job.storage_url, job.study_name, job.experiment_id, study, job.parent_id, heartbeats,
                   finished, states.count(TrialState.COMPLETE))

    def run(self, data, *, jobs: int = 1, threads: int = 0, data_dir: Optional[str] = None, budget: Optional[int] = None,
            timeout: Optional[float] = None, hooks: Hooks = Hooks(), ray: bool = False) -> int:
        """Work on the study in this process (jobs 1) or in `jobs` worker processes (each loads the data
        from `data_dir`); `budget` trials in all (None: until the plan says stop). `ray`: the workers are tasks
        on the Ray cluster this process joined (`cluster.connect`), `jobs` 0 as many as it has slots. Returns
        the workers."""
        if ray:
            return self._run_on_ray(data, jobs, threads, data_dir, budget, timeout, hooks)
        if jobs <= 1:
            if self.finished_before:
                self.study.sampler = self.plan.sampler(0, self.finished_before)
            self.work(self.plan.objective(self, data, hooks), budget=None if budget is None else Budget(budget),
                      timeout=timeout, hooks=hooks)
            return 1
        jobs = jobs if budget is None else min(jobs, budget)
        shared = None if budget is None else Budget(budget)
        gpus = worker_gpus(self.plan.device, jobs)
        return self._start_workers(
            [Job(self.plan, self.storage_url, self.study_name, self.experiment_id, self.parent_id, data_dir, data.subset,
                 i, shared, timeout) for i in range(jobs)],
            lambda args: workers.run_workers(run_job, args, tracking_uri(), threads, gpus), hooks)

    def _run_on_ray(self, data, jobs: int, threads: int, data_dir: Optional[str], budget: Optional[int],
                    timeout: Optional[float], hooks: Hooks) -> int:
        from . import cluster

        threads = threads or 1  # one CPU slot each: Ray counts CPUs, and tasks share a node's cores
        waiting = len(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        slots = cluster.slots(self.plan.device, threads)
        jobs = max(1, min(min(jobs, slots) if jobs else slots, budget if budget is not None else waiting or 1))
        storage_url, uri = cluster.worker_urls(self.storage_url, tracking_uri())
        shared = None if budget is None else cluster.ClusterBudget(budget)
        return self._start_workers(
            [Job(self.plan, storage_url, self.study_name, self.experiment_id, self.parent_id, data_dir, data.subset,
                 i, shared, timeout) for i in range(jobs)],
            lambda args: cluster.run_tasks(run_job, args, uri, self.plan.device, threads), hooks)

    def _start_workers(self, job_list: list, launch: Callable, hooks: Hooks) -> int:
        """Run one worker per Job (`launch` starts them and returns their exit codes) while this process owns
        the parent: an interrupt (even before a worker has opened it) ends it KILLED here."""
        with open_run(self.plan.name, kind=self.plan.kind, run_id=self.parent_id):
            if hooks.on_workers is not None:
                hooks.on_workers(len(job_list))
            self.check_workers(launch([(job,) for job in job_list]), hooks)
        return len(job_list)

    def check_workers(self, codes: list, hooks: Hooks) -> None:
        """After the workers: a worker that failed with an error fails the command; a worker lost to a signal
        (SIGKILL, out of memory) fails it only if work is left undone, since the others fail its trial and
        redo its work once its heartbeats stop (then the parent is summarized as usual)."""
        errors = [c for c in codes if c and c > 0]
        lost = [c for c in codes if c and c < 0]
        left = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
        if errors or (lost and left):
            undone = f"; {len(left)} trial(s) left waiting or running" if left else ""
            raise WorkerError(f"worker exit codes {codes}{undone}; see the runs for reasons, and run the command "
                              "again to finish the study")
        if lost and hooks.on_lost is not None:
            hooks.on_lost(len(lost))

    def work(self, objective: Callable, *, budget: Optional[Budget] = None, timeout: Optional[float] = None,
             hooks: Hooks = Hooks()) -> int:
        """Run trials in this process while the plan wants more and the command's `budget` has trials left
        (and while a lost worker's retry waits), then stay while other workers' trials run: fail the lost
        ones and run their retries. Returns the trials run. `timeout` (seconds) stops starting trials, and
        waiting, after it."""
        deadline = time.monotonic() + timeout if timeout else None
        callbacks = [*self.plan.callbacks(), *([lambda study, trial: hooks.on_trial_end(trial)] if hooks.on_trial_end else [])]
        ran = 0
        with open_run(self.plan.name, kind=self.plan.kind, run_id=self.parent_id):
            while deadline is None or time.monotonic() < deadline:
                if (self.plan.more(self.study) and (budget is None or budget.claim())) or retry_waiting(self.study):
                    # (Optuna fails stale trials as each trial starts)
                    self.study.optimize(objective, n_trials=1, catch=self.plan.catch, callbacks=callbacks)
                    ran += 1
                    continue
                running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if not running or not self.heartbeats:
                    break  # without heartbeats (a journal file) a lost trial cannot be told from a slow one
                if hooks.on_wait is not None:
                    hooks.on_wait(len(running))
                wait_while_running(self.study, heartbeat_interval())
                optuna.storages.fail_stale_trials(self.study)  # a lost worker's trial: failed here, its retry queued
        return ran

    def close(self):
        """Reap the runs of workers that died before their trial could name them, then let the plan
        summarize the study on its parent run; returns the plan's report."""
        self.reap_orphans()
        with open_run(self.plan.name, kind=self.plan.kind, run_id=self.parent_id):
            return self.plan.report(self)

    def retried(self) -> int:
        """How many trials of the study redo the work of a lost worker."""
        return sum(retried(t) is not None for t in self.study.get_trials(deepcopy=False))

    def reap_orphans(self) -> int:
        """End KILLED the trial runs under the parent that are RUNNING although their trial has ended: their
        process is gone. A run names its trial (tag TAG_TRIAL) from its first moment; runs of trials still
        RUNNING are left to the heartbeats."""
        if self.heartbeats:
            optuna.storages.fail_stale_trials(self.study)
        running = {str(t.number) for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        reaped = 0
        for child in child_runs(self.parent_id):
            tags = child.data.tags
            if child.info.status == "RUNNING" and tags.get(TAG_KIND) in (KIND_SWEEP_CHILD, KIND_TRIAL, KIND_CONFIRM) and \
                    tags.get(TAG_STUDY) == self.tag and tags.get(TAG_TRIAL) not in running:
                end_run_as(child.info.run_id, "KILLED", ORPHAN_REASON)
                reaped += 1
        return reaped


def run_job(job: Job) -> None:
    """Entry point of a `--jobs` worker process: load the data, join the study, work on it."""
    from ..training.data import load

    shared = SharedStudy.join(job)
    data = load(job.data_dir, subset=job.subset)

    def on_trial_end(trial) -> None:
        print(f"worker {os.getpid()}: trial {trial.number} {trial.state.name}", flush=True)

    def on_raced(config, why, label) -> None:
        print(f"worker {os.getpid()}: {label}: raced out, not run ({why.split(';')[0]})", flush=True)

    hooks = Hooks(on_trial_end=on_trial_end, on_raced=on_raced)
    shared.work(job.plan.objective(shared, data, hooks), budget=job.budget, timeout=job.timeout, hooks=hooks)


def wait_while_running(study: optuna.Study, seconds: float) -> None:
    """Sleep up to `seconds`, returning as soon as no trial of the study is RUNNING: the last trial of a
    sweep usually ends well before a heartbeat interval, and the waiting worker (and its command) should
    not sit out the rest of it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return


def retry_waiting(study: optuna.Study) -> bool:
    return any(retried(t) is not None for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
