"""BERT pretraining and fine-tuning on DeepSpeed.

The entry scripts (pipeline/pretrain.py, finetune.py, export.py, embed.py, report.py, run_all.py
and preprocessing/run_beam.py) begin with ``if __package__ in (None, ""): sys.path[0] = <checkout>``.
Run as a file, a script gets its own folder as sys.path[0]: its sibling modules (data.py,
model.py, metrics.py, tracking.py, options.py, ...) would shadow top-level modules of those
names for every library imported after, and a checkout that is not installed could not import
its own package. The checkout's root in its place fixes both. Installed, the console scripts
(bert-preprocess, bert-pretrain, bert-finetune, bert-export, bert-embed, bert-report) import the package
normally and skip it.
"""
