"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018; docs/privacy.md).

* :mod:`fedmq.privacy.clipping`: the device side: what is sent is clipped in L2 norm to the
  clip norm *as the coordinator decodes it* (after Top-K and quantization), and, under
  distributed noise, the device's Gaussian noise share. NumPy only: devices install nothing more.
* :mod:`fedmq.privacy.aggregation`: the coordinator's sum of clipped client updates with
  uniform weights, Gaussian noise and a fixed denominator.
* :mod:`fedmq.privacy.accountant`: the privacy ledger and the epsilon it spends, computed by
  Google's ``dp-accounting`` (the coordinator extra; imported only by that module).
"""
