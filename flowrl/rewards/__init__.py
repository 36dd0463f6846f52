"""The reward zoo. Importing this package registers the built-in rewards."""

from flowrl.rewards import base  # noqa: F401
from flowrl.rewards.geneval import reward as _geneval_reward  # noqa: F401
