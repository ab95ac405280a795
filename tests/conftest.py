import os
import sys

import pytest

# tests/reference.py (the literal model of the rules) is imported by several test files.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def lenet():
    """The example network, exported on the calibration split, with the MNIST splits (the
    methods tests; test_export and test_driver_offload define their own ``lenet``)."""
    from skipconv.sw import data, export, zoo
    model = zoo.get_model("lenet", progress=False)
    splits = data.mnist_split()
    net = export.export(model, splits["calib"].x, spec={"zoo": "lenet"})
    return model, net, splits
