"""The error of a manual-download dataset (ImageNet, ADE20K) whose files are not there."""


class ManualDownloadError(FileNotFoundError):
  """The files a manual-download dataset is prepared from are not in the manual directory."""
