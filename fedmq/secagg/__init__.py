"""Secure aggregation of sparse client updates, as a pure library (no MQTT phases yet).

The coordinator learns the sum of a round's updates and nothing else about any one of them
(Bonawitz et al. 2017; SecAgg+, Bell et al. 2020), on a support common to the round so that
masks line up with sparse updates:

- :mod:`fedmq.secagg.support`: the common support every party derives from shared state;
- :mod:`fedmq.secagg.ring`: the fixed-point ring that a sum of the round's inputs cannot wrap;
- :mod:`fedmq.secagg.masking`: SecAgg+'s sparse graph, the PRG, pairwise seeds from X25519;
- :mod:`fedmq.secagg.shamir`: t-of-n Shamir shares of the seeds and mask keys;
- :mod:`fedmq.secagg.protocol`: the phases as client and server state objects, unmasking
  after dropouts, clean failure below the threshold.

Threat model and what it does not protect: docs/security.md.
"""

from fedmq.secagg.protocol import (AdvertisedKeys, RoundParams, SecAggClient, SecAggError, SecAggServer,
                                   UnmaskRequest, UnmaskResponse)
from fedmq.secagg.ring import RingError, RingSpec
from fedmq.secagg.support import SupportError, common_support, values_on_support

__all__ = ["AdvertisedKeys", "RingError", "RingSpec", "RoundParams", "SecAggClient", "SecAggError", "SecAggServer",
           "SupportError", "UnmaskRequest", "UnmaskResponse", "common_support", "values_on_support"]
