"""Write a tiny random-weight Hugging Face checkpoint of a real architecture.

    python scripts/make_tiny_model.py OUT_DIR --family qwen3 [--shard] [--seed N]
"""

import argparse
import os
import sys

try:
    from asyncserve.testing.tiny_model import FAMILIES, build_tiny_checkpoint
except ImportError:  # run from a source checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from asyncserve.testing.tiny_model import FAMILIES, build_tiny_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to create (must not exist or be empty)")
    parser.add_argument("--family", choices=FAMILIES, default="qwen3")
    parser.add_argument("--shard", action="store_true", help="split the weights over several files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        path = build_tiny_checkpoint(args.out_dir, args.family, seed=args.seed, shard=args.shard)
    except FileExistsError as error:
        sys.exit(f"error: {error}")
    print(path)


if __name__ == "__main__":
    main()
