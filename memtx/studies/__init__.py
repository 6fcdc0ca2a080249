"""The LaMemo paper's studies over trained work directories, each a command writing a markdown
table, a JSON of its numbers (with their provenance) and a PNG plot:

    python -m memtx.studies.extrapolation      --workdir runs/default/xl/seed0 runs/default/lamemo/seed0  # Fig. 5
    python -m memtx.studies.alpha              --workdir runs/default/lamemo/seed0                        # Fig. 6
    python -m memtx.studies.attention_distance --workdir runs/default/xl/seed0 runs/default/lamemo/seed0  # Fig. 1
"""
