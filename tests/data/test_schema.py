"""Encoded and padded batches carry exactly the keys, dtypes and ranks `data.schema` writes down."""

import numpy as np
import pytest

from jaxgrounding.data import schema
from tests import test_train, test_train_timescope


@pytest.mark.parametrize(
    "config_of, table",
    [(test_train.micro_config, schema.SUPERVISED), (test_train_timescope.micro_config, schema.STREAMED)],
    ids=["supervised", "streamed"],
)
def test_a_training_batch_has_the_schema(tmp_path, config_of, table):
    _, batch = test_train.first_batch(config_of(tmp_path / "data"), str(tmp_path / "run"))
    want = schema.batch_keys(table)
    assert set(batch) == set(want)
    for key, (dtype, rank) in want.items():
        value = np.asarray(batch[key])
        assert value.ndim == rank, key
        assert value.dtype.kind == "U" if dtype == "str" else value.dtype == np.dtype(dtype), (key, value.dtype)


def test_every_variable_key_has_a_bucket():
    from configs import timescope
    from jaxgrounding import settings

    buckets = settings.pipeline_config(timescope.get_config(), train=True, batch_size=1).buckets
    for table in (schema.SUPERVISED, schema.STREAMED, schema.DECODED):
        assert {k for k, f in table.items() if schema.variable_axis(f)} <= set(buckets)
    assert set(settings.prompt_buckets(timescope.get_config())) == {
        k for k, f in schema.PROMPT.items() if schema.variable_axis(f)
    }
