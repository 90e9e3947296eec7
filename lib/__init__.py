"""The shell around the research core: the run's options (config), its checkpoints, records
(run_log), folder and lock (run_folder), console lines, processes (distributed, stopping), data
pipelines, the loop of a run (engine) and the fast path (compile, its guards). The method itself, which knows
nothing of these, is lib/core/. Nothing here imports `main.py` or the commands in tools/."""
