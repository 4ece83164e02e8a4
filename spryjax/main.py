"""The spryjax command line.

    python -m spryjax.main --config=configs/NAME.py[:ARG] [--config.some.field=value ...] [--workdir=runs/NAME]
    spryjax --config=configs/NAME.py ...        (the same, as an installed console script)

The config's `experiment` field picks what runs, from the explicit table `spryjax.runners.EXPERIMENTS`. Before
anything is written, every field of the config is checked (names, option names, value ranges, paths) and the
workdir is prepared (`spryjax.runners.workdir`: a path that can hold a run, a lock against a second run, a
resumed run's config compared with the one it started with). Every field the run used is saved to
`WORKDIR/config.json`. Failures end with one line on stderr: exit code 2 for bad input, 3 for a diverged run,
130 for Ctrl-C (the line says where the same command resumes); nothing already written is lost. Bad input met
only while loading (a data file's columns) takes back the config.json of a workdir that held no run, so the
corrected command can use it.
"""
from __future__ import annotations

import os
import re
import sys

# transformers (used for configs and tokenizers only) would announce at import that PyTorch is absent.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from spryjax.errors import InputError, run_command  # noqa: E402
from spryjax.runners import EXPERIMENTS, Experiment  # noqa: E402

PROG = "spryjax"


def define_flags(values: flags.FlagValues, argv: list[str]) -> None:
    """--config, --workdir, --take_over_lock and --branch_from on `values` (the launcher adds its own flags)."""
    config_flags.DEFINE_config_file("config", None, "Path to a config file defining get_config([ARG]), as "
                                    "PATH or PATH:ARG.", flag_values=values, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and the resolved config "
                                         "(default: runs/<config file name>).", flag_values=values)
    flags.DEFINE_bool("take_over_lock", False, "Take over a workdir lock held by a process on another host (after "
                                               "making sure that run is gone).", flag_values=values)
    flags.DEFINE_string("branch_from", None, "A run's workdir whose newest checkpoint a new --workdir starts from "
                                             "(to continue its state with another config).", flag_values=values)


def explain_flag_error(exc: Exception, argv: list[str]) -> str:
    """Turns absl / ml_collections parsing exceptions into one line naming the offending argument."""
    text = " ".join(str(exc).replace("\\n", " ").split())
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "?")
    if isinstance(exc, AttributeError) and "has no attribute 'get_config'" in text:
        return f"--config: {spec.split(':')[0]} defines no get_config()"
    if isinstance(exc, (AttributeError, KeyError)) or "Unknown command line flag 'config." in text:
        missing = re.search(r"flag 'config\.([^']+)'", text) or re.search(r"'([^'\\]+)", text)
        name = missing.group(1) if missing else "?"
        culprit = next((a.split("=")[0] for a in overrides if a.split("=")[0].endswith(name)), "--config.")
        hint = re.search(r'Did you mean "([^"]+)"', text)
        suggestion = f" (did you mean '{hint.group(1)}'?)" if hint else ""
        return f"{culprit}: the config has no field '{name.split('.')[-1]}'{suggestion}"
    if isinstance(exc, OSError) and "Failed loading config file" in text:
        path = re.search(r"No such file or directory: '([^']+)'", text)
        return f"--config: no config file at {path.group(1)}" if path else f"--config: {text}"
    if "Traceback (most recent call last)" in str(exc):   # get_config raised: its last line says why
        last = [line.strip() for line in str(exc).replace("\\n", "\n").splitlines() if line.strip()][-1]
        return f"--config={spec}: get_config failed: {last}"
    return text


def make_configs_importable(argv: list[str]) -> None:
    """Config files may import their siblings (`from configs import spry_rt_minilm`, `from configs.paper import
    spry`): the folder holding the config's folder, or above it the folder holding its outermost package (folders
    with an __init__.py), goes on sys.path, so that works from any working directory."""
    for arg in argv[1:]:
        if arg.startswith("--config="):
            folder = os.path.dirname(os.path.dirname(os.path.abspath(arg.split("=", 1)[1].split(":")[0])))
            while os.path.isfile(os.path.join(folder, "__init__.py")):
                folder = os.path.dirname(folder)
            if folder not in sys.path:
                sys.path.insert(0, folder)


def forget_loaded_config() -> None:
    """ml_collections loads every config file as the module "config_config" with `SourceFileLoader.load_module`,
    which executes a second file into the first one's module: a get_config the second file lacks would survive.
    Dropping the module first makes each load start clean (one process may load several configs: tests, sweeps)."""
    sys.modules.pop("config_config", None)


def parse_argv(argv: list[str], values: flags.FlagValues) -> list[str]:
    """Parses `argv` into `values` (config loaded and overridden); bad input is one `InputError` line."""
    make_configs_importable(argv)
    forget_loaded_config()
    try:
        rest = values(argv)
        if values.config is None:
            raise InputError("--config is required, e.g. --config=configs/default.py")
        values.config.to_dict()  # a config that failed to load raises here
    except InputError:
        raise
    except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError, SyntaxError, ImportError) as exc:
        raise InputError(explain_flag_error(exc, argv)) from None
    if len(rest) > 1:
        raise InputError(f"unexpected argument {rest[1]!r} (flags are --name=value)")
    return rest


def resolve_experiment(name: str) -> Experiment:
    """The runner of `config.experiment`."""
    if name not in EXPERIMENTS:
        raise InputError(f"config.experiment: unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]


def default_workdir(values: flags.FlagValues) -> str:
    if values.workdir is None:
        return os.path.join("runs", os.path.splitext(os.path.basename(values["config"].config_filename))[0])
    if not values.workdir.strip():
        raise InputError("--workdir: empty; give a directory, or leave the flag out for runs/<config name>")
    return values.workdir


def usage(values: flags.FlagValues, names: tuple[str, ...] = ("config", "workdir", "take_over_lock", "branch_from"),
          doc: str = __doc__) -> str:
    """--help and -h: the command's docstring and its flags."""
    return doc.strip() + "\n\nflags:\n" + "\n".join(f"  --{name}: {values[name].help}" for name in names)


def run_cli(argv: list[str]) -> int:
    """The command line, in-process: argv in (argv[0] the program), exit code out, failures one line on stderr."""
    from spryjax.runners import workdir as workdir_lib
    values = flags.FlagValues()
    define_flags(values, argv)
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
        print(usage(values))
        return 0

    def main() -> None:
        parse_argv(argv, values)
        config = values.config
        experiment = resolve_experiment(config.get("experiment", ""))
        workdir = default_workdir(values)
        experiment.check(config)
        fresh = not os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE))
        with workdir_lib.prepared(config, workdir, take_over_lock=values.take_over_lock,
                                  branch_from=values.branch_from):
            try:
                experiment.run(config, workdir)
            except InputError:
                if fresh:   # under the workdir's lock: no other run's config.json is touched
                    forget_unstarted_run(workdir)
                raise
    return run_command(main, PROG)


def forget_unstarted_run(workdir: str) -> None:
    """After bad input met while loading (a data file's columns, say), a workdir that held no run before and
    recorded nothing (no metrics, no checkpoints) loses the config.json just written, so that the corrected command
    can use the same --workdir."""
    from spryjax.metrics import METRICS_FILE
    from spryjax.runners.workdir import CONFIG_FILE
    if not any(os.path.exists(os.path.join(workdir, name)) for name in (METRICS_FILE, "checkpoints")):
        os.remove(os.path.join(workdir, CONFIG_FILE))


def entry_point() -> None:
    """The console script `spryjax` and `python -m spryjax.main`."""
    sys.exit(run_cli(sys.argv))


if __name__ == "__main__":
    entry_point()
