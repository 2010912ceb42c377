"""Hyperparameter sweeps: a search space over ``PipelineParams`` (``space.py``) and the record of a study's
trials in MLflow and as a table (``record.py``). The study itself and a trial's eval-loss reports live in
``steps/core/study.py``; the orchestration (trials as flow runs, the best one registered) in flows/sweep.py.
"""
