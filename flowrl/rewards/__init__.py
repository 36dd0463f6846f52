"""The reward zoo. Importing this package registers the built-in rewards (no model is loaded and no
optional package is imported until a reward is built)."""

from flowrl.rewards import aesthetic as _aesthetic  # noqa: F401
from flowrl.rewards import base  # noqa: F401
from flowrl.rewards import clipscore as _clipscore  # noqa: F401
from flowrl.rewards import ocr as _ocr  # noqa: F401
from flowrl.rewards import pickscore as _pickscore  # noqa: F401
from flowrl.rewards.geneval import reward as _geneval_reward  # noqa: F401
