"""Training: configs, data, the optax step and the loop, usable from the CLI and notebooks.

    from lucid_fn.train import fit, load_config
    fit(load_config("configs/digits.toml"))

Needs grain (data), orbax-checkpoint (checkpoints), tqdm and matplotlib, which the
package installs; ``import lucid_fn`` itself does not import this module.
"""

from lucid_fn.train.checkpoint import CheckpointError
from lucid_fn.train.config import Config, ConfigError, load_config
from lucid_fn.train.datasets import DataError
from lucid_fn.train.loop import Interrupted, NonFiniteLossError, evaluate_file, fit
from lucid_fn.train.metrics import read_metrics
from lucid_fn.train.step import make_optimizer, train_step
from lucid_fn.train.workdir import WorkdirError

__all__ = ["CheckpointError", "Config", "ConfigError", "DataError", "Interrupted",
           "NonFiniteLossError", "WorkdirError", "evaluate_file", "fit", "load_config",
           "make_optimizer", "read_metrics", "train_step"]
