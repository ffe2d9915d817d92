"""Training: the one Ray Train loop for every method, checkpoints (evaluation is :mod:`talkmesh.eval`).

- :mod:`talkmesh.train.config` - ``ExperimentConfig`` / ``TrainConfig`` and ``load_experiment``;
- :mod:`talkmesh.train.loop` - ``train_loop_per_worker`` (the loop Ray Train runs);
- :mod:`talkmesh.train.runner` - ``run_training`` (TorchTrainer + MLflow run) -> ``RunResult``;
- :mod:`talkmesh.train.checkpoint` - checkpoint / method directories, ``load_method``.

Nothing heavy is imported here; import the submodules.
"""
