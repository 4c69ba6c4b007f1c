"""A 2-process DDP fit on CPU (gloo) with a small privacy budget.

Run as a script (Lightning's DDP launcher re-executes it for rank 1): ``ddp_guard_run.py DIR
same [ACCOUNTANT TARGET]`` gives both ranks that target (3.6 by default) and each rank writes
``rank<N>.json`` into DIR; ``ddp_guard_run.py DIR mismatch`` gives rank 0 a different target,
which must fail on every rank before any step instead of letting the ranks drift apart.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import lightning.pytorch as pl

from dp_models import DPModel
from privacy_callbacks import PrivacyMonitor


def main(out_dir: str, mode: str, accountant: str = "rdp", target: str = "3.6") -> None:
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    budget = 100.0 if mode == "mismatch" and rank == 0 else float(target)
    monitor = PrivacyMonitor(delta=1e-5, target_epsilon=budget, session_id="ddp")
    model = DPModel(accountant=accountant)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3,
                         callbacks=[monitor], enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    result = {"global_step": trainer.global_step,
              "history": [list(seg) for seg in model.privacy_engine.accountant.history],
              "exhausted": monitor.last_snapshot.budget_exhausted}
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(*sys.argv[1:])
