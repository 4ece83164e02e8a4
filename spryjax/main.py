"""The spryjax command line.

    python -m spryjax.main --config=configs/NAME.py [--config.some.field=value ...] [--workdir=runs/NAME]
    spryjax --config=configs/NAME.py ...        (the same, as an installed console script)

The config's `experiment` field picks what runs, from the explicit table `spryjax.runners.EXPERIMENTS`. Every
field the run used is saved to `WORKDIR/config.json`. Bad input (an unknown field, a wrong type, a missing file, a bad value
found later by the library) ends with one line on stderr and exit code 2; the workdir keeps what was written.
"""
from __future__ import annotations

import os
import re
import sys

# transformers (used for configs and tokenizers only) would announce at import that PyTorch is absent.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from spryjax.errors import InputError  # noqa: E402
from spryjax.metrics import save_config  # noqa: E402
from spryjax.runners import EXPERIMENTS  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file defining get_config().", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and the resolved config "
                                     "(default: runs/<config file name>).")

def fail(message: str) -> None:
    """Prints one line and exits with code 2 (bad input)."""
    print(f"spryjax: error: {message}", file=sys.stderr)
    sys.exit(2)


def explain_flag_error(exc: Exception, argv: list[str]) -> str:
    """Turns absl / ml_collections parsing exceptions into one line naming the offending argument."""
    text = " ".join(str(exc).replace("\\n", " ").split())
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    if isinstance(exc, (AttributeError, KeyError)):
        missing = re.search(r"'([^'\\]+)", text)
        name = missing.group(1) if missing else "?"
        culprit = next((a.split("=")[0] for a in overrides if f".{name}" in a.split("=")[0]), "--config.")
        hint = re.search(r'Did you mean "([^"]+)"', text)
        suggestion = f" (did you mean '{hint.group(1)}'?)" if hint else ""
        return f"{culprit}: the config has no field '{name}'{suggestion}"
    if isinstance(exc, OSError) and "Failed loading config file" in text:
        path = re.search(r"No such file or directory: '([^']+)'", text)
        return f"--config: no config file at {path.group(1) if path else '?'}" if path else f"--config: {text}"
    return text


def make_configs_importable(argv: list[str]) -> None:
    """Config files may import their siblings (`from configs import spry_rt_minilm`): the folder holding the
    config's folder goes on sys.path, so that works from any working directory."""
    for arg in argv[1:]:
        if arg.startswith("--config="):
            folder = os.path.dirname(os.path.dirname(os.path.abspath(arg.split("=", 1)[1].split(":")[0])))
            if folder not in sys.path:
                sys.path.insert(0, folder)


def parse_flags(argv: list[str]) -> list[str]:
    make_configs_importable(argv)
    try:
        rest = FLAGS(argv)
        if FLAGS.config is None:
            fail("--config is required, e.g. --config=configs/default.py")
        FLAGS.config.to_dict()  # a config that failed to load raises here
        return rest
    except flags.Error as exc:
        fail(explain_flag_error(exc, argv))
    except (AttributeError, KeyError, OSError, TypeError, ValueError, SyntaxError) as exc:
        fail(explain_flag_error(exc, argv))


def resolve_experiment(name: str):
    """The runner of `config.experiment`."""
    if name not in EXPERIMENTS:
        raise InputError(f"config.experiment: unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # absl would otherwise print JAX's backend probing at INFO
    config = FLAGS.config
    config_path = FLAGS["config"].config_filename
    workdir = FLAGS.workdir or os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])
    try:
        runner = resolve_experiment(config.get("experiment", ""))
        save_config(config, workdir)
        runner(config, workdir)
    except InputError as exc:
        fail(str(exc))


def entry_point() -> None:
    """The console script `spryjax` and `python -m spryjax.main`."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    entry_point()
