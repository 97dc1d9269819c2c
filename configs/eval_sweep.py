"""The methods comparison of benchmarks/quality.md: every method at 1/8, 1/16 and 1/32, and the
methods that can store that little at 1/64 and 1/128 (DeltaDQ, Delta-CoMe, LowRank,
FeatLowRank, DARE; BitDelta and RTN/GPTQ stop at 1 bit, DSnoT's stored mask at 1/32).

`get_config()` returns a list of (label, method dict, options) rows for `scripts/eval.py
--sweep=configs/eval_sweep.py` (and `benchmarks/bench_quality.py`). Options: `target` (the nominal
ratio the row aims at, shown in the table; the TRUE linear and whole ratios come from
`accounting`), `calib_windows` (0: a calibrated method's data-free mode; default: the script's
--calib_windows) and any other `deltajax.config.RunConfig` field (a row becomes one through
`config.from_dict`; an unknown key skips the row with the error). Rows whose method is not
registered in `deltajax.methods.REGISTRY` are skipped with a notice.

How each method reaches a ratio (16-bit delta = 16 bits per linear parameter):

* Delta-CoMe, LowRank, FeatureLowRank, DeltaDQ: their own `ratio` (ranks / kept count from a
  budget of true stored bytes);
* DARE: `p` = 1 − α (bf16 kept values, an 8-byte seed per matrix: ratio ≈ 1/(1−p));
* DSnoT: stored mask (uint16 column index per kept entry, or a bitmap, whichever is smaller) +
  bf16 values = 32 bits per kept entry, so keeping a fraction α/2 gives α;
* BitDelta: fixed 1 bit + one fp32 scale per matrix ≈ 16×;
* RTN / GPTQ by bits: b bits + a bf16 scale and zero per group of 128 = b + 0.25 bits (asym),
  b + 0.125 (sym), more where d_in is not a multiple of 128 (SmolLM2's 576 pads to 640): on
  SmolLM2, 2-bit = 2.44 bits/param = 6.6× (the 1/8 row), 1-bit sym = 1.22 bits = 13.1× (the 1/16
  row); they cannot reach 1/32 (that needs < 0.5 bit per entry), so they have no 1/32 row.
"""

ALPHAS = ((8, "1/8"), (16, "1/16"), (32, "1/32"))


def get_config():
    rows = []
    for inv, t in ALPHAS:
        a = 1 / inv
        if inv == 8:
            rows += [
                (f"RTN 2-bit g128 (≈{t})", {"name": "rtn", "bits": 2, "group": 128},
                 {"target": t}),
                (f"GPTQ 2-bit g128 (≈{t})", {"name": "gptq", "bits": 2, "group": 128},
                 {"target": t}),
            ]
        if inv == 16:
            rows += [
                (f"RTN 1-bit g128 sym (≈{t})", {"name": "rtn", "bits": 1, "group": 128,
                                                "sym": True}, {"target": t}),
                ("BitDelta (no distillation)", {"name": "bitdelta"}, {"target": t}),
                (f"Delta-CoMe α={t} data-free", {"name": "deltacome", "ratio": a},
                 {"target": t, "calib_windows": 0}),
            ]
        rows += [
            (f"Delta-CoMe α={t}", {"name": "deltacome", "ratio": a}, {"target": t}),
            (f"LowRank α={t}", {"name": "lowrank", "ratio": a}, {"target": t}),
            (f"FeatLowRank α={t}", {"name": "featlowrank", "ratio": a}, {"target": t}),
            (f"DARE p={1 - a:.4g}", {"name": "dare", "p": 1 - a}, {"target": t}),
            (f"DSnoT keep {a / 2:.4g}", {"name": "dsnot", "sparsity": 1 - a / 2},
             {"target": t}),
            (f"DeltaDQ α={t} 1-bit", {"name": "deltadq", "ratio": a, "bits": 1}, {"target": t}),
        ]
    # DeltaDQ's code width: 2 bits (the default since this sweep) vs 1 bit at the same true ratio,
    # at 1/16 to 1/128.
    rows += [(f"DeltaDQ α=1/{inv} 2-bit", {"name": "deltadq", "ratio": 1 / inv, "bits": 2},
              {"target": f"1/{inv}"}) for inv in (16, 32, 64, 128)]
    # Extreme ratios (where 1/16 saturates): every method that can store that little.
    for inv in (64, 128):
        a, t = 1 / inv, f"1/{inv}"
        rows += [
            (f"DeltaDQ α={t} 1-bit", {"name": "deltadq", "ratio": a, "bits": 1}, {"target": t}),
            (f"Delta-CoMe α={t}", {"name": "deltacome", "ratio": a}, {"target": t}),
            (f"LowRank α={t}", {"name": "lowrank", "ratio": a}, {"target": t}),
            (f"FeatLowRank α={t}", {"name": "featlowrank", "ratio": a}, {"target": t}),
            (f"DARE p={1 - a:.4g}", {"name": "dare", "p": 1 - a}, {"target": t}),
        ]
    return rows
