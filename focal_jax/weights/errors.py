"""Errors of weights that cannot be used; each message names the file or value, what was
expected and what was found."""


class WeightsError(ValueError):
  """Weights that cannot be used; the message says which and why."""


class StateDictMismatch(WeightsError):
  """A state_dict that does not fit the requested variant."""


class InvalidWeights(WeightsError):
  """Weights of the right names and shapes whose values cannot be used: not floating
  point, or not finite."""


class WeightsFileError(WeightsError):
  """A weights file that cannot be read or is not a checkpoint; the message names it."""


class UnsafeCheckpointError(WeightsFileError):
  """A `.pth` whose pickle names functions or classes beyond tensors, containers and the
  official yacs config: loading it could run code, so it is refused."""
