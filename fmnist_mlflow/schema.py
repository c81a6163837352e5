"""The run schema: every MLflow tag key, run kind and Optuna attribute name the package writes and queries.

Resume, warm start, registry selection and recovery all find runs by these names; a typo in one place would
break them silently, so each name is defined here once and imported everywhere else.
"""

# Characters a name may not hold: experiment, study, grid and registered-model names are matched in MLflow
# filter strings, where a quote, backtick or backslash would end or escape the literal.
FILTER_UNSAFE = "'\"`\\"

# --- run kinds (tag KIND) ---------------------------------------------------------------------------------
KIND_TRAIN = "train"  # one config from `fmnist train`
KIND_SWEEP = "sweep"  # a grid's parent run
KIND_SWEEP_CHILD = "sweep-child"  # one (config, seed) of a grid
KIND_SEARCH = "search"  # an Optuna study's parent run
KIND_TRIAL = "trial"  # one trial of a search
KIND_CONFIRM = "confirm"  # a search's best trial re-run on a fresh seed (`fmnist search --confirm`)
KIND_LAUNCHER = "launcher"  # the run `mlflow run` made, when the work was logged elsewhere (tag PARENT says where)
KIND_EVALUATION = "evaluation"  # a registered model evaluated on the test set, nested under its training run
KINDS = (KIND_TRAIN, KIND_SWEEP, KIND_SWEEP_CHILD, KIND_SEARCH, KIND_TRIAL, KIND_CONFIRM, KIND_LAUNCHER, KIND_EVALUATION)

# --- tags on every run -----------------------------------------------------------------------------------
TAG_KIND = "fmnist.kind"  # one of KINDS
TAG_FAILURE = "fmnist.failure_reason"  # why a run ended FAILED or KILLED
TAG_CONFIG_HASH = "fmnist.config_hash"  # one (config, seed): what resume matches
TAG_CONFIG_GROUP = "fmnist.config_group"  # shared by the seeds of one config: group by it in the UI
TAG_CONFIG_NAME = "fmnist.config"  # a readable name of the config, shared by its seeds
TAG_THREADS = "torch_threads"  # CPU threads the training process used
TAG_GPU = "fmnist.gpu"  # the host's id of the GPU a `--jobs` worker was pinned to (several GPUs)
TAG_RAY_NODE = "fmnist.ray_node"  # the Ray node a `--ray` task ran the run on
TAG_WORKER = "fmnist.worker"  # host:pid of the process that started the run (which worker ran what)

# --- tags on parents (sweep, search) -----------------------------------------------------------------------
TAG_SWEEP = "fmnist.sweep"  # a sweep parent: the digest of its configs
TAG_STUDY = "fmnist.study"  # the Optuna study a parent (or trial) belongs to: name@digest of the storage URL
TAG_PARENT = "fmnist.parent"  # on a launcher: the parent run that holds the work
TAG_BEST_RUN = "fmnist.best_run_id"  # a sweep parent: the best config's best seed run
TAG_BEST_GROUP = "best_config_group"  # a sweep parent: the best config's group (beside best_model, best_lr, ...)
TAG_SELECT = "fmnist.select"  # a sweep parent: the validation metric that picked the best
TAG_FAILED_CONFIGS = "fmnist.failed_configs"  # a sweep parent: configs that did not finish
TAG_RETRIED = "fmnist.retried"  # a parent: how many trials were retried after their worker was lost
TAG_CHAMPION = "fmnist.champion_run_id"  # a search parent: the confirmed champion config's best seed run
TAG_CHAMPION_TRIAL = "fmnist.champion_trial"
TAG_CHAMPION_GROUP = "fmnist.champion_config_group"
TAG_CONFIRM_SEEDS = "fmnist.confirm_seeds"  # a search parent: the seeds the champion was confirmed on
TAG_CONFIRM_STUDY = "fmnist.confirm_study"  # a search parent: the confirm study whose finished answer it holds;
#                                             a confirm run: the confirm study it belongs to
TAG_STOPPED = "fmnist.stopped_because"  # a search parent: why the study stopped itself (when it did)
TAG_TRIALS = "fmnist.trials"  # a search parent: trials in the study (and fmnist.trials_<state> per state)
TAG_PRUNER_REPLAY = "fmnist.pruner_replay"  # a search parent, + ".<pruner>": what that pruner would have stopped

# --- tags on registered model versions ---------------------------------------------------------------------
VERSION_SOURCE_RUN = "source_run_id"  # the run whose model the version is
VERSION_SEED_RUNS = "seed_run_ids"  # comma-separated: the runs of every seed of the version's config
VERSION_CONFIG = "config"  # JSON: the config's params
TAG_ALIAS_HISTORY = "fmnist.alias_history"  # + ".<alias>": JSON list of the alias's moves and their reasons

# --- tags on trials -----------------------------------------------------------------------------------------
TAG_TRIAL = "fmnist.trial"  # the Optuna trial number
TAG_CONFIRMS = "fmnist.confirms_trial"  # a confirm run: the search trial whose config it re-runs
TAG_STATE = "fmnist.trial_state"  # the Optuna state: COMPLETE, PRUNED or FAIL
TAG_BEST_TRIAL = "fmnist.best_trial"  # "true" on the run of a study's best trial

# --- Optuna study and trial attributes ----------------------------------------------------------------------
ATTR_PARENT = "mlflow_parent_run_id"  # study: the MLflow parent run every worker logs under (set last: ready)
ATTR_HOLDS = "fmnist_holds"  # study: "grid <name> <digest>" or "space <name> <digest>": workers must agree
ATTR_CONTENDERS = "contenders"  # confirm study: the contenders it runs (name, trial, params, roles), fixed by its creator
ATTR_SEARCH_STUDY = "search_study"  # confirm study: the search study it confirms
ATTR_CHAMPION = "champion"  # search study: the config its confirm named champion (trial, group, run, mean, seeds)
ATTR_STOPPED = "stopped_because"  # search study: why it stopped itself (studies.stopping)
ATTR_ANSWER = "answer"  # grid study: where its answer is (the seed-mean ranking on the parent run)
ATTR_RULES = "fmnist_rules"  # study: how its trials are judged ({"pruner": .., "sampler": ..} or {"race": ..})
ATTR_RUN = "mlflow_run_id"  # trial: its MLflow run
ATTR_POINT = "point"  # queued trial of a grid: a readable name of its (config, seed)
ATTR_REQUEUED = "requeued_from"  # queued trial of a grid: the interrupted trial whose point it runs again
ATTR_NO_POINT = "no_point"  # trial of a grid that found the queue empty (other workers took the last points)
ATTR_WARM_START = "warm_start_from"  # queued trial of a search: the grid run whose config it tries
ATTR_START_POINT = "start_point"  # queued trial of a search: its index in the space file's start_points
ATTR_RACED_OUT = "raced_out"  # PRUNED trial of a grid: why its config got no more seeds (nothing ran)
TAG_RACE = "fmnist.race"  # a sweep parent: "on" or "off" (whether configs shown worse got no more seeds)
