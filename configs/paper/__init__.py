"""One config file per paper, each a table: every (task × model × method) of the paper's main table as
`get_config("TASK,METHOD")` and the whole table as `get_sweep()` (docs/paper_configs.md)."""


def parse_cell(arg: str, tasks, choices, default: str, what: str = "METHOD") -> tuple[str, str]:
    """"TASK,CHOICE" (or "TASK": `default`) -> (task, choice), each checked against its names."""
    task, _, choice = arg.partition(",")
    choice = choice or default
    if task not in tasks or choice not in choices:
        raise ValueError(f"argument {arg!r}: expected TASK[,{what}] with TASK in {', '.join(tasks)} and {what} in "
                         f"{', '.join(choices)}")
    return task, choice


def table_cells(arg: str | None, tasks, choices, what: str = "METHOD") -> list[tuple[str, str]]:
    """The (task, choice) cells of `get_sweep(arg)`: all of them (arg None), every choice of one task ("TASK"), or
    one cell ("TASK,CHOICE")."""
    if arg is None:
        return [(t, c) for t in tasks for c in choices]
    if "," in arg:
        return [parse_cell(arg, tasks, choices, "", what)]
    return [parse_cell(f"{arg},{c}", tasks, choices, "", what) for c in choices]
