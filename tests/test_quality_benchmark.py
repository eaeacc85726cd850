"""The quality benchmark's bookkeeping: what its table says about EOS and strategies."""

from benchmarks.quality import draws_ended, strategy_sets, table


def test_draws_ended_counts_every_draw_before_dropping():
    # 843 of 3,360 draws hit the token limit; the 2,400 kept all end with EOS by construction
    assert abs(draws_ended({"generated": 3360, "truncated": 843}) - 0.749) < 1e-3
    assert draws_ended({"generated": 0}) is None


def test_dp_finetune_runs_without_the_topic_list():
    assert strategy_sets("dp_finetune", ["a=1"]) == [
        "a=1",
        "generator.strategy=dp_finetune",
        "generator.topics=none",
    ]
    assert strategy_sets("prompted", []) == ["generator.strategy=prompted"]


def test_table_shows_draws_and_kept_sets_apart():
    metrics = {
        kind: {"probe_accuracy": 0.7, "mauve": 0.8, "fed": 0.3, "fed_bias_corrected": 0.1}
        for kind in ("unfiltered", "filtered")
    }
    figures = {
        "wild": {
            "real_floor": {
                "probe_accuracy": 0.5,
                "mauve": 0.96,
                "fed": 0.2,
                "fed_bias_corrected": 0.08,
            },
            "strategies": {
                "prompted": {
                    "seconds": 600,
                    "epsilon": 4.0,
                    "ended_with_stop": {"draws": 0.749, "unfiltered": 1.0, "filtered": 1.0},
                    "duplicate_rate": {"sampler": 0.001, "filtered": 0.0},
                    "metrics": {
                        **metrics,
                        "cluster_tv": {"unfiltered": 0.3, "filtered": 0.2},
                        "gap_closed_fed": 0.5,
                        "gap_closed_fed_bias_corrected": 0.57,
                    },
                }
            },
        }
    }
    lines = table(figures).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    unfiltered = [c.strip() for c in lines[3].strip("|").split("|")]
    filtered = [c.strip() for c in lines[4].strip("|").split("|")]
    assert len(header) == len(unfiltered) == len(filtered) == len(lines[1].strip("|").split("|"))
    column = header.index("draws ended with stop")
    assert unfiltered[column] == "74.9%" and filtered[column] == ""
    assert filtered[header.index("kept ended with stop")] == "100.0%"


def test_filtered_row_gives_the_spread_over_filter_draws():
    from benchmarks.quality import filter_spread

    floor = {"probe_accuracy": 0.5, "mauve": 0.96, "fed": 0.2, "fed_bias_corrected": 0.1}
    unfiltered = {"probe_accuracy": 0.75, "mauve": 0.55, "fed": 0.3, "fed_bias_corrected": 0.2}
    draws = [
        {"probe_accuracy": p, "mauve": 0.85, "fed": f, "fed_bias_corrected": f - 0.1}
        for p, f in ((0.70, 0.25), (0.72, 0.27))
    ]
    spread = filter_spread(draws, unfiltered, floor)
    assert spread["draws"] == 2
    assert abs(spread["probe_accuracy"]["mean"] - 0.71) < 1e-9
    assert abs(spread["probe_accuracy"]["std"] - 0.01) < 1e-9
    assert abs(spread["gap_closed_fed"]["mean"] - 0.4) < 1e-9  # (0.5 + 0.3) / 2
    row = {
        "seconds": 60,
        "epsilon": 4.0,
        "ended_with_stop": {"draws": 0.9, "unfiltered": 1.0, "filtered": 1.0},
        "duplicate_rate": {"sampler": 0.0, "filtered": 0.0},
        "metrics": {
            "unfiltered": unfiltered,
            "filtered": draws[0],
            "filtered_draws": spread,
            "cluster_tv": {"unfiltered": 0.3, "filtered": 0.2},
            "gap_closed_fed": 0.5,
            "gap_closed_fed_bias_corrected": 0.5,
        },
    }
    lines = table({"wild": {"real_floor": floor, "strategies": {"prompted": row}}}).splitlines()
    filtered = [c.strip() for c in lines[4].strip("|").split("|")]
    assert filtered[3] == "0.710 ± 0.010" and filtered[7].startswith("40%")
