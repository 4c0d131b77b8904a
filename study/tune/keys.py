"""The keys a trial's report carries between its worker and the driver, and the metrics Optuna records.

A module of names only: the trainable (in each trial's worker) and the driver's searcher, pruner and
results callback read the same keys without the worker importing the driver's side.
"""
METRIC = "best_val_psnr"    # a trial's value in Optuna: its best epoch's val PSNR (RGB, dB)
STEP_METRIC = "val_psnr"    # each epoch's intermediate value in Optuna: that epoch's own val PSNR
ERROR_KEY = "trial_error"   # set in a trial's last report when it failed for a reason a retry cannot fix
MEMBERS_KEY = "members"     # a pack's report: {str(member index): epoch row} of the members still in it
PARKED_KEY = "budget_parked"   # set in a report when the time budget stopped the trial at this epoch's end
