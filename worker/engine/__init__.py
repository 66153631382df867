"""The unlearning engine: plain PyTorch and numpy.

It knows nothing of HTTP, SQL or Celery. Importing this package is cheap: submodules import
torch themselves, and ``datafile`` (dataset validation) needs only numpy, so the API process can
validate uploads without torch.
"""
