"""The labelling app's logic and its job handlers (bootstrap, alignment round, compare); pages under app/ only lay out.

One concern per module: :mod:`~fkpd.studio.config` (configuration, first start, local
worker, shared constants), :mod:`~fkpd.studio.auth` (admin and annotator),
:mod:`~fkpd.studio.labelling` (pairs for the browser, answers), :mod:`~fkpd.studio.history`
(versions, training jobs, rounds history, export), :mod:`~fkpd.studio.compare` (the
``compare`` job), :mod:`~fkpd.studio.params` (typed job parameters),
:mod:`~fkpd.studio.batches` (the round engine wired to the store),
:mod:`~fkpd.studio.bootstrap` and :mod:`~fkpd.studio.alignment` (the ``bootstrap`` and
``alignment_round`` jobs), :mod:`~fkpd.studio.topup` (the ``top_up`` job: more pairs
while people label and rounds train), :mod:`~fkpd.studio.autoround` (automatic rounds),
:mod:`~fkpd.studio.projects` (creating, listing and picking projects: the app's Projects
page and ``fkpd projects``), :mod:`~fkpd.studio.upkeep` (what idle workers check) and
:mod:`~fkpd.studio.serve` (what ``make run`` starts). Importing this package registers the four job handlers and the
idle hook, so ``fkpd worker`` (``handler_modules=["fkpd.studio"]``) runs them.
"""

from fkpd.studio import alignment, bootstrap, topup, upkeep  # noqa: F401 (register the job handlers, idle hook)
from fkpd.studio.autoround import AutoRoundState, auto_round_state, maybe_start_round, set_auto_rounds
from fkpd.studio.auth import AdminAuth, clean_annotator_name
from fkpd.studio.compare import COMPARE, CompareParams, compare, compare_videos, enqueue_compare
from fkpd.studio.config import (
    ACTIVE,
    DEFAULT_INSTRUCTIONS,
    OUTCOMES,
    ROUND_FIELDS,
    TRAINING_KINDS,
    StudioConfig,
    StudioError,
    default_instructions,
    open_project,
    start_local_worker,
    start_local_workers,
)
from fkpd.studio.history import (
    active_training_job,
    current_version,
    enqueue_round,
    error_headline,
    export_bytes,
    job_summary,
    latest_training_job,
    remembered_round_params,
    retry_bootstrap,
    rounds_history,
    version_label,
)
from fkpd.studio.labelling import DisplayPair, LabelQuality, batch_caption, clip_video_b64, lease_for_display, \
    record_answers, set_assignment, set_label_quality
from fkpd.studio.topup import TopUpState, maybe_top_up, top_up_state
from fkpd.studio.batches import roll_back, served_versions
from fkpd.train.evaluate import describe_comparison
from fkpd.studio.errors import ParamError, RoundError
from fkpd.studio.params import BatchSettings, BootstrapParams, RoundParams, round_defaults

__all__ = ['COMPARE', 'TRAINING_KINDS', 'ACTIVE', 'OUTCOMES', 'ROUND_FIELDS', 'DEFAULT_INSTRUCTIONS', 'default_instructions',
           'StudioError', 'StudioConfig', 'open_project', 'current_version', 'served_versions', 'retry_bootstrap',
           'active_training_job', 'latest_training_job', 'job_summary', 'error_headline', 'start_local_worker',
           'AdminAuth', 'clean_annotator_name', 'DisplayPair', 'clip_video_b64', 'lease_for_display', 'record_answers',
           'rounds_history', 'enqueue_round', 'remembered_round_params', 'export_bytes', 'CompareParams', 'enqueue_compare', 'compare',
           'compare_videos', 'version_label', 'ParamError', 'RoundError', 'BatchSettings', 'BootstrapParams',
           'RoundParams', 'round_defaults', 'roll_back', 'describe_comparison', 'start_local_workers',
           'AutoRoundState', 'auto_round_state', 'maybe_start_round', 'set_auto_rounds', 'TopUpState', 'maybe_top_up',
           'top_up_state', 'batch_caption', 'LabelQuality', 'set_label_quality', 'set_assignment']
