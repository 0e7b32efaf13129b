"""Issue #18's accuracy check: the e2e-1m run's models (a validation sample of 400,000
customers, BG/NBD and Gamma-Gamma fitted on 50,000) against the full method (every
validation customer, BG/NBD and Gamma-Gamma on every customer), on the same data.

    python bench/full_method.py bench/out/e2e-1m/processed/<run_id>
"""
import functools
import json
import sys
import time
from pathlib import Path

from analysis import models, segments
from analysis.config import load_config
from analysis.features import connect_run
from analysis.store import RunStore

cfg = load_config(Path(__file__).parent / "e2e-1m.yaml")
pdir = sys.argv[1]
store = RunStore(pdir)
a = cfg.analysis
models.bgnbd_baseline = functools.partial(models.bgnbd_baseline, max_customers=None)
models.lifetime_outlook = functools.partial(models.lifetime_outlook, max_customers=None)
con = connect_run(pdir, cfg)
t = time.perf_counter()
run = models.fit_and_evaluate(con, as_of=store.scoring_date(), horizon_days=store.horizon_days(),
                              n_cutoffs=a.n_cutoffs, step_days=a.cutoff_step_days,
                              exclude=cfg.protected + cfg.pii, seed=cfg.seed, device=a.device,
                              lifecycle=segments.lifecycle_thresholds(a),
                              reasons_sample=a.reasons_sample_for(store.n_customers()),
                              score_features=store.read_profile_table(), max_valid_rows=10**9)
full_s = time.perf_counter() - t
sampled = models.read_model_run(pdir)
out = {"full_seconds": round(full_s, 1)}
for name, r in (("run", sampled), ("full", run)):
    out[name] = {"churn_chosen": r.churn_chosen, "value_chosen": r.value_chosen,
                 "churn_auc": r.churn_metrics.set_index("method")["roc_auc"].round(6).to_dict(),
                 "churn_auc_active": r.churn_metrics_active.set_index("method")["roc_auc"].round(6).to_dict(),
                 "value_mae": r.value_metrics.set_index("method")["mae"].round(4).to_dict()}
print(json.dumps(out, indent=1))
