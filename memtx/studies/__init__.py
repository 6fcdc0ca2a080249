"""The LaMemo paper's studies over trained work directories, each a command writing a markdown
table, a JSON of its numbers and a PNG plot:

    python -m memtx.studies.extrapolation      --workdir runs/txl_cpu runs/lamemo_cpu   # Figure 5
    python -m memtx.studies.alpha              --workdir runs/lamemo_cpu                # Figure 6
    python -m memtx.studies.attention_distance --workdir runs/txl_cpu runs/lamemo_cpu   # Figure 1
"""
