"""Property-based fuzzing of the whole engine on random CNN graphs (tests/fuzz_models.py).
A few hundred examples here; bench/fuzz.py runs thousands."""
import warnings

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_models import check, nets


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(nets())
def test_random_cnns(case):
    net, expected = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(net, expected)
