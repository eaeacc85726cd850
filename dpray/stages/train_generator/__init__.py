"""The DP generator-training stage (``dpray train-generator``)."""

from dpray.stages.train_generator.stage import STAGE, run, train_generator

__all__ = ["STAGE", "run", "train_generator"]
