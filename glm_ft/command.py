"""The `glm-ft` command (also `python -m glm_ft`): one entry point with the ecosystem's subcommands.

    glm-ft train experiment=quickstart method=lora     # = python train.py <overrides>; -m for sweeps
    glm-ft train --config-dir ~/my-configs experiment=mine   # your own configs on Hydra's search path
    glm-ft chat RUN | predict RUN DATA | export RUN OUT [--format hf] | compare | serve RUN | ui

It works from any folder: run folders (`outputs/`), sweeps (`multirun/`) and the default MLflow store (`mlflow.db`,
`mlartifacts/`) are written under the folder it is run from. MLFLOW_TRACKING_URI, or `tracking.tracking_uri=` on the
command line, chooses another store.
"""

import argparse
import importlib
import os
import sys
from pathlib import Path

from glm_ft.heap import freeze_at_exit

# subcommand -> (module whose main(argv) runs it, one-line help)
SUBCOMMANDS = {
    "train": ("glm_ft.cli", "fine-tune: python train.py with Hydra overrides (-m sweeps, --config-dir DIR)"),
    "chat": ("glm_ft.infer.chat", "chat in the terminal with a run, checkpoint or model folder"),
    "predict": ("glm_ft.infer.predict", "generate and score predictions for a data file"),
    "export": ("glm_ft.infer.export", "write a full model: THUDM layout, or --format hf for stock transformers"),
    "compare": ("glm_ft.tracking.compare", "a sweep's runs side by side, best first, with a plot"),
    "serve": ("glm_ft.infer.serve", "an OpenAI-compatible chat-completions server on 127.0.0.1"),
    "ui": (None, "the MLflow UI on this folder's store, http://127.0.0.1:5000 (--port N)"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "usage: glm-ft {" + ",".join(SUBCOMMANDS) + "} ...\n\n" + "\n".join(lines) + \
        "\n\n`glm-ft SUBCOMMAND --help` for each one's options.\n"


def default_tracking_uri(cwd: Path) -> str:
    return f"sqlite:///{cwd.resolve()}/mlflow.db"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        sys.stderr.write(f"glm-ft: unknown subcommand {name!r}\n{usage()}")
        return 2
    # The store of this folder, unless the user chose one (the environment, or an override on the command line).
    if "MLFLOW_TRACKING_URI" not in os.environ and not any(a.startswith("tracking.tracking_uri=") for a in rest):
        os.environ["MLFLOW_TRACKING_URI"] = default_tracking_uri(Path.cwd())
    if name == "ui":
        return ui(rest)
    freeze_at_exit()  # export and compare load torch or MLflow too: their exit need not walk it all (glm_ft/heap.py)
    module = importlib.import_module(SUBCOMMANDS[name][0])
    if name == "train":
        sys.argv = [f"glm-ft {name}", *rest]  # Hydra reads sys.argv
        module.main()
        return 0
    return int(module.main(rest) or 0)


def ui(rest: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="glm-ft ui", description=SUBCOMMANDS["ui"][1])
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(rest)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"],
               "--host", "127.0.0.1", "--port", str(args.port)]
    os.execv(sys.executable, command)  # the UI becomes this process: Ctrl-C and signals reach it directly
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
