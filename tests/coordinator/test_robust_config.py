"""``[aggregation]``: the rule and its options reach the aggregator; bad ones are refused."""

import pytest

from coordinator.config import config_from_dict
from fedmq.errors import ConfigError
from fedmq.fl.aggregation import make_aggregator
from fedmq.fl.robust import TrimmedMean


def test_the_coordinator_configuration_chooses_the_rule_and_its_options():
    cfg = config_from_dict({"federation": "f", "task": "digits-logreg",
                            "aggregation": {"rule": "trimmed-mean", "trim": 0.3, "unsent": "zero"}})
    agg = make_aggregator(cfg.aggregation.rule, 4, cfg.aggregation.options())
    assert isinstance(agg, TrimmedMean) and agg.trim == 0.3 and agg.unsent == "zero"
    for bad in ({"rule": "median", "unsent": "skip"}, {"rule": "krum", "byzantine": 0.5}, {"rule": "bulyan"}):
        with pytest.raises(ConfigError):
            config_from_dict({"federation": "f", "task": "digits-logreg", "aggregation": bad})
