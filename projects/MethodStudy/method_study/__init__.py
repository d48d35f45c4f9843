"""kd_det's method study: which distillation methods pay off, with a protocol that can tell.

The concepts, one module each:

* the **plan** (:mod:`.plan`): dev-sweep trials per method family and the final methods built from
  their picks, trained with :mod:`kd_det.utils.runs` (one ``tools/train_net.py`` run each);
* the **study** (:mod:`.run_study`): schedules the runs, reuses finished ones, writes the reports;
* the **ledger** (:mod:`.ledger`): one small committed record per finished run, from which the
  reports are rebuilt on a clone without the runs' checkpoints;
* the **report** (:mod:`.report`, :mod:`.verdicts`, :mod:`.plots`): tables per split, Welch
  verdicts against the student alone, regime checks, curves;
* **generalization** (:mod:`.run_generalization`, :mod:`.make_external_coco`,
  :mod:`.external_sources`): the tuned settings on data from another generator;
* the **tuned configs** users start from (:mod:`.export_tuned_configs`).

The package works on the kd_det checkout it lives in (:data:`REPO`: its configs and
``tools/train_net.py``) and writes into :data:`RESULTS` by default; install it editable.
"""

import os

#: The kd_det checkout this project lives in.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
#: The study's results: reports and ledger committed, ``runs/`` and ``data/`` not.
RESULTS = os.path.join(REPO, "projects", "MethodStudy", "results")
