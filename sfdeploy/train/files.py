"""The names of what a training run writes in WORK, owned here: training writes them, export and
the demo read them, and none of those needs MMAction2 imported to know them."""

from __future__ import annotations

#: the full MMAction2 config of the run (what ``--resume`` and export read)
CONFIG_FILE = "config.py"
#: best top-1, best checkpoint, epochs run, strategies: written when training ends
SUMMARY_FILE = "finetune_summary.json"
#: what the Runner does not know (preset, classes, pretrained report, a teacher): written before
#: training, read by the summary hook
RUN_INFO = "sfdeploy_run.json"
#: WORK/annotations: the union's rewritten lists when several datasets are trained on
ANNOTATIONS_DIR = "annotations"
