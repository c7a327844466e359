"""Training-framework integrations, one optional extra each.

* :mod:`dstmtl.integrations.lightning`: a PyTorch Lightning callback
  (``pip install 'dstmtl[lightning]'``).
* :mod:`dstmtl.integrations.huggingface`: a Hugging Face ``Trainer`` with the scheduler in its
  loss, and its callback (``pip install 'dstmtl[huggingface]'``).

This package imports neither framework; each submodule imports its own when it is imported.
"""
