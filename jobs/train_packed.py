"""Train one model in a single process from a pack (a lone GPU box without Ray).

python jobs/train_packed.py --set pack=.devdata/pbc128.parquet --set model=mobilenet_v2 \
    --set epochs=60 --set output=runs/packed/mobilenet_v2
Keys: see bloodray.train.pack.PackedTrainConfig. Writes <output>/checkpoint (a normal
bloodray checkpoint), result.json (val/test metrics, history, timings) and the
final config (config.yaml).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bloodray.config import ConfigError, dump_yaml, load_config  # noqa: E402
from bloodray.train.pack import PackedTrainConfig, PackError, train_packed  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML with PackedTrainConfig keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key")
    args = p.parse_args(argv)
    try:
        cfg = load_config(PackedTrainConfig, args.config, args.set)
        cfg.validate()
        os.makedirs(cfg.output, exist_ok=True)
        with open(os.path.join(cfg.output, "config.yaml"), "w") as fh:
            fh.write(dump_yaml(cfg))
        result = train_packed(cfg)
    except (ConfigError, PackError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {k: result.get(k) for k in ("model", "input_size", "parameters", "epochs_run", "best_epoch",
                                         "train_time_s", "train_images_per_s", "eval_images_per_s", "device")}
    for split in ("val", "test"):
        if split in result:
            summary[split] = {k: result[split][k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
