"""How fast the input pipeline feeds the default run, grain against a plain numpy loader.

    .venv/bin/python benchmarks/data_loader.py

All produce the default run's batches (64 digits at 32x32, shuffled per epoch, random
2-pixel shifts) on the host; the train step itself is not involved. Prints batches/s for:
grain example by example (its own shuffle, per-example random_map, batch), grain over
whole batches as lucid_fn.train.data.train_iterator does (0 and 2 worker processes), and
a plain numpy loop doing the same per-example work.
"""

import time

import numpy as np

from lucid_fn.train import data, datasets, load_config

BATCHES = 300


def rate(it, n=BATCHES):
    next(it)  # start-up (worker processes) is not throughput
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - t)


def numpy_loader(source, batch, seed, augment):
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(source))
        for i in range(0, len(order) - batch + 1, batch):
            yield datasets.stack_items(augment(source[j], rng) for j in order[i:i + batch])


def main():
    cfg = load_config()
    ds = datasets.load(cfg.data)
    aug = data.augment_fn(cfg.augment, cfg.data.img_size)
    results = {}
    import grain

    per_example = (grain.MapDataset.source(ds.train).seed(0).shuffle().repeat()
                   .random_map(aug).batch(64, drop_remainder=True).to_iter_dataset())
    results["grain, per example"] = rate(iter(per_example))
    for workers in (0, 2):
        it = data.train_iterator(ds.train, batch_size=64, seed=0, augment=aug, workers=workers)
        results[f"grain, batches, {workers} workers"] = rate(it)
        data.close(it)
    results["numpy loop"] = rate(numpy_loader(ds.train, 64, 0, aug))
    for name, r in results.items():
        print(f"{name:<28} {r:8.0f} batches/s  ({r * 64:9.0f} img/s)")


if __name__ == "__main__":
    main()
