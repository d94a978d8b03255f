"""The `billing` command line: the only package that knows argparse and rich."""
